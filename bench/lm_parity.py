#!/usr/bin/env python3
"""Numerical parity of rudder-lm against Hugging Face transformers (f32, same GGUF dequantized)
and llama.cpp (llama-cpp-python, same quantized GGUF), teacher-forced on the 256-token bench
prompt of peer-baselines.md §6.

usage: lm_parity.py GGUF RUDDER_BIN OUT.json
"""
import json, os, subprocess, sys, tempfile
import numpy as np

gguf, rudder, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
PARAGRAPH = ("Collaborative filtering predicts what a user will like from the preferences of many users. "
             "Graph neural networks propagate embeddings over the user-item bipartite graph, and models such "
             "as LightGCN drop feature transforms and nonlinearities to keep only neighborhood aggregation. ")
THREADS = 2
tmp = tempfile.mkdtemp()
res = {"model": os.path.basename(gguf)}

# --- llama.cpp: tokenizer ids and all-position logits of the quantized model
from llama_cpp import Llama
llm = Llama(model_path=gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=512,
            logits_all=True, seed=0, verbose=False)
ids = llm.tokenize((PARAGRAPH * 12).encode(), add_bos=False, special=False)[:256]
llm.reset()
llm.eval(ids)
lc = np.array(llm.scores[: len(ids)], dtype=np.float32)
del llm
json.dump(ids, open(f"{tmp}/ids.json", "w"))

def dump(extra, name):
    path = f"{tmp}/{name}.safetensors"
    subprocess.run([rudder, "--threads", str(THREADS), "lm", "dump", "--model", gguf, "--ids", f"{tmp}/ids.json",
                    "--out", path] + extra, check=True)
    from safetensors.numpy import load_file
    return load_file(path)

rq = dump([], "rq")
rf = dump(["--dequantize", "--hidden"], "rf")
# rudder's own tokenizer on the same text
tok = subprocess.run([rudder, "lm", "dump", "--model", gguf, "--text", PARAGRAPH * 12, "--out", f"{tmp}/tok.safetensors"],
                     check=True, capture_output=True)
from safetensors.numpy import load_file
rt = load_file(f"{tmp}/tok.safetensors")["ids"][:256].tolist()
res["tokenizer_ids_equal_llama_cpp"] = rt == ids

# --- HF transformers, f32 from the same GGUF
import torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(THREADS)
d, f = os.path.dirname(gguf), os.path.basename(gguf)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
model.eval()
with torch.inference_mode():
    o = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
hf_logits = o.logits[0].numpy()
hs = [h[0].numpy() for h in o.hidden_states]
L = len(hs) - 1
names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + ["ln_final.hook_normalized"]
layer_err = []
for i, n in enumerate(names):
    a, b = hs[i], rf[n]
    # relative error per position (‖Δ‖/‖h‖), worst position and layer reported
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
    layer_err.append(float(rel.max()))
res["hf_f32"] = {
    "hidden_rel_err_max_over_layers_and_positions": max(layer_err),
    "hidden_rel_err_per_layer": layer_err,
    "top1_agreement": float((hf_logits.argmax(1) == rf["logits"].argmax(1)).mean()),
    "max_abs_logit_diff": float(np.abs(hf_logits - rf["logits"]).max()),
    "positions": len(ids),
}
res["llama_cpp_q4_1"] = {
    "top1_agreement": float((lc.argmax(1) == rq["logits"].argmax(1)).mean()),
    "max_abs_logit_diff": float(np.abs(lc - rq["logits"]).max()),
    "mean_abs_logit_diff": float(np.abs(lc - rq["logits"]).mean()),
    "llama_cpp_vs_hf_f32_top1": float((lc.argmax(1) == hf_logits.argmax(1)).mean()),
    "llama_cpp_vs_hf_f32_max_abs_logit_diff": float(np.abs(lc - hf_logits).max()),
    "rudder_q_vs_hf_f32_top1": float((rq["logits"].argmax(1) == hf_logits.argmax(1)).mean()),
    "rudder_q_vs_hf_f32_max_abs_logit_diff": float(np.abs(rq["logits"] - hf_logits).max()),
}
json.dump(res, open(out_path, "w"), indent=1)
print(json.dumps({k: v for k, v in res.items()}, indent=1)[:3000])
