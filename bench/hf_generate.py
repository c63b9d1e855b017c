#!/usr/bin/env python3
"""Hugging Face transformers' batched `generate` on CPU (f32, 2 threads), the peer of rudder's
batched rollouts: B rows of the 256-token bench prompt, 128 new tokens each (greedy, EOS
ignored), aggregate generated tokens per second including prefill, median of REPS runs after a
warm-up.

usage: hf_generate.py F32.gguf BATCHES(comma) [DECODE=128] [REPS=2]
"""
import json, os, sys, time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, batches = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
decode = int(sys.argv[3]) if len(sys.argv) > 3 else 128
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 2
torch.set_num_threads(2)
PARAGRAPH = ("Collaborative filtering predicts what a user will like from the preferences of many users. "
             "Graph neural networks propagate embeddings over the user-item bipartite graph, and models such "
             "as LightGCN drop feature transforms and nonlinearities to keep only neighborhood aggregation. ")
d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
ids = tok(PARAGRAPH * 12, add_special_tokens=False)["input_ids"][:256]
out = []
for b in batches:
    x = torch.tensor([ids] * b)
    att = torch.ones_like(x)
    times = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = model.generate(x, attention_mask=att, max_new_tokens=decode, min_new_tokens=decode,
                               do_sample=False, pad_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        assert y.shape[1] == len(ids) + decode
        if r > 0:
            times.append(dt)
    times.sort()
    t = times[len(times) // 2]
    out.append({"batch": b, "wall_s": t, "aggregate_tok_s": b * decode / t})
    print(json.dumps(out[-1]), flush=True)
