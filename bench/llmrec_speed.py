#!/usr/bin/env python3
"""Peer side of the LoRA training-throughput comparison (docs/benchmarks.md): one SFT optimizer
step = forward + backward of BATCH sequences of PROMPT prompt tokens + 4 answer tokens (loss on
the answer only) + AdamW, with transformers + peft on CPU in f32, LoRA r 8, α 32, dropout 0.1 on
q,k,v,o,gate,up,down. The same shapes as `step_profile` on the rudder side.

usage: llmrec_speed.py HF_FOLDER [BATCH] [PROMPT] [STEPS] [THREADS]  → one JSON line
"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

hf = sys.argv[1]
b = int(sys.argv[2]) if len(sys.argv) > 2 else 4
t = int(sys.argv[3]) if len(sys.argv) > 3 else 180
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 4
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
model.config.use_cache = False
cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
ids = torch.tensor([[100 + (i * 7 + r) % 5000 for i in range(t)] + [300, 400, 500, 2] for r in range(b)])
labels = ids.clone()
labels[:, :t] = -100
times = []
for s in range(steps + 1):
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
    opt.step()
    opt.zero_grad()
    if s > 0:  # the first step warms up
        times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"tool": "transformers+peft", "torch": torch.__version__, "batch": b, "prompt": t,
                  "threads": threads, "median_step_s": times[len(times) // 2],
                  "tokens_per_s": b * (t + 4) / times[len(times) // 2],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
