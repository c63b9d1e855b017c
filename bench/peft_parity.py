#!/usr/bin/env python3
"""LoRA adapters move between rudder and Hugging Face peft with the same logits.

1. rudder writes the base model as a Hugging Face folder (`rudder lm export-hf`).
2. peft → rudder: a random LoRA (r 8, α 32, all seven projections, non-zero B) made and saved
   by peft; logits of transformers+peft vs `rudder lm dump --adapter` on the exported folder and
   on the original GGUF (Q/K rows reordered on load).
3. rudder → peft: an adapter trained by `rudder llmrec sft` loaded with PeftModel.from_pretrained.

usage: peft_parity.py RUDDER_BIN GGUF RUDDER_ADAPTER OUT.json
"""
import json, subprocess, sys, tempfile
import numpy as np
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

rudder, gguf, radapter, out_path = sys.argv[1:5]
torch.manual_seed(0)
torch.set_num_threads(2)
tmp = tempfile.mkdtemp()
hf = f"{tmp}/hf"
subprocess.run([rudder, "lm", "export-hf", "--model", gguf, "--out", hf], check=True)
ids = [int(x) for x in np.random.RandomState(1).randint(100, 40000, size=96)]
json.dump(ids, open(f"{tmp}/ids.json", "w"))

def rudder_logits(model, adapter, extra=()):
    p = f"{tmp}/d.safetensors"
    subprocess.run([rudder, "lm", "dump", "--model", model, "--adapter", adapter, "--ids", f"{tmp}/ids.json",
                    "--out", p, *extra], check=True, capture_output=True)
    return load_file(p)["logits"]

def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

def torch_logits(m):
    m.eval()
    with torch.inference_mode():
        return m(torch.tensor([ids])).logits[0].float().numpy()

res = {"positions": len(ids)}
# peft -> rudder
base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
pm = get_peft_model(base, cfg)
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.copy_(torch.randn_like(p) * 0.02)
want = torch_logits(pm)
pm.save_pretrained(f"{tmp}/peft_py")
res["peft_to_rudder_hf_folder_rel_err"] = rel(rudder_logits(hf, f"{tmp}/peft_py"), want)
res["peft_to_rudder_gguf_f32_rel_err"] = rel(rudder_logits(gguf, f"{tmp}/peft_py", ["--dequantize"]), want)
with torch.no_grad():
    with pm.disable_adapter():
        base_logits = torch_logits(pm)
res["peft_adapter_changes_logits_by_rel"] = rel(want, base_logits)
del pm, base
# rudder -> peft
base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
pm = PeftModel.from_pretrained(base, radapter)
want2 = torch_logits(pm)
res["rudder_to_peft_rel_err"] = rel(rudder_logits(gguf, radapter, ["--dequantize"]), want2)
res["rudder_adapter_changes_logits_by_rel"] = rel(want2, base_logits)
json.dump(res, open(out_path, "w"), indent=1)
print(json.dumps(res, indent=1))
