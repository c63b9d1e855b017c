#!/usr/bin/env python3
"""Speed of rudder-lm next to its peers on the same machine, 2 threads, one process each:
llama.cpp (prefill 256 tokens, 128 greedy decode steps), HF transformers (all-layer hidden
states of 100 prompts), sentence-transformers (1,682 ml-100k titles, batch 64).

usage: lm_speed.py RUDDER_BIN GGUF MINILM_DIR ML100K_ITEM OUT.json [part ...]
parts: decode capture embed (default: all)
"""
import json, os, statistics, subprocess, sys, tempfile, time
import numpy as np

rudder, gguf, minilm, item_file, out_path = sys.argv[1:6]
parts = sys.argv[6:] or ["decode", "capture", "embed"]
T = 2
os.environ["OMP_NUM_THREADS"] = str(T)
PARAGRAPH = ("Collaborative filtering predicts what a user will like from the preferences of many users. "
             "Graph neural networks propagate embeddings over the user-item bipartite graph, and models such "
             "as LightGCN drop feature transforms and nonlinearities to keep only neighborhood aggregation. ")
res = json.load(open(out_path)) if os.path.exists(out_path) else {}
tmp = tempfile.mkdtemp()

def titles():
    rows = [l.rstrip("\n").split("\t") for l in open(item_file, encoding="utf-8")]
    col = [h.split(":")[0] for h in rows[0]].index("movie_title")
    return [r[col] for r in rows[1:]]

def rudder_json(args):
    p = subprocess.run([rudder, "--threads", str(T)] + args, check=True, capture_output=True, text=True)
    return p

if "decode" in parts:
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_threads=T, n_threads_batch=T, n_ctx=1024, n_batch=512, seed=0, verbose=False)
    ids = llm.tokenize((PARAGRAPH * 12).encode(), add_bos=False, special=False)[:256]
    n_vocab = llm.n_vocab()
    def logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
    pre, dec = [], []
    for rep in range(6):
        llm.reset()
        t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
        tok = int(logits().argmax())
        t2 = time.perf_counter()
        for _ in range(127):
            llm.eval([tok]); tok = int(logits().argmax())
        t3 = time.perf_counter()
        if rep:
            pre.append(len(ids) / (t1 - t0)); dec.append(127 / (t3 - t2))
    del llm
    r = json.loads(rudder_json(["lm", "bench", "--model", gguf, "--reps", "5"]).stdout)
    res["decode"] = {
        "llama_cpp": {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec)},
        "rudder": {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]},
        "ratio_prefill": r["prefill_tok_s"] / statistics.median(pre),
        "ratio_decode": r["decode_tok_s"] / statistics.median(dec),
    }
    print(json.dumps(res["decode"], indent=1))

if "capture" in parts:
    t = titles()[:10]
    genres = ["action", "comedy", "drama", "horror", "romance", "thriller", "documentary", "animation", "western", "science fiction"]
    prompts = [f"Write a short review of the movie {a}. Describe the plot, the acting and the pacing, and say whether you would recommend it to a friend who mostly watches {g} films." for a in t for g in genres]
    pf = f"{tmp}/prompts.txt"
    open(pf, "w").write("\n".join(prompts) + "\n")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(T)
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    hf = {}
    for bs in (1, 5, 20):
        times = []
        for rep in range(2):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(prompts), bs):
                    enc = tok(prompts[i:i + bs], return_tensors="pt", padding=True)
                    o = model(**enc, output_hidden_states=True, use_cache=False)
                    _ = [h.numpy() for h in o.hidden_states]
            times.append(time.perf_counter() - t0)
        hf[f"batch_{bs}"] = len(prompts) / min(times)
    del model
    ru, whole = {}, {}
    for bs in (1, 5, 20):
        best, best_whole = 0, 0
        for rep in range(2):
            t0 = time.perf_counter()
            p = rudder_json(["lm", "capture", "--model", gguf, "--dequantize", "--prompts", pf, "--sites", "hf",
                             "--positions", "all", "--batch-size", str(bs), "--out", f"{tmp}/acts.safetensors"])
            best_whole = max(best_whole, len(prompts) / (time.perf_counter() - t0))
            best = max(best, float(p.stderr.split("(")[-1].split(" prompts/s")[0]))
        ru[f"batch_{bs}"], whole[f"batch_{bs}"] = best, best_whole
    res["capture"] = {"prompts": len(prompts), "positions": "all", "sites": "embeddings + 30 block inputs (+ final norm)",
                      "hf_transformers_f32_in_process": hf, "rudder_f32_in_process": ru,
                      "rudder_f32_whole_process_incl_load_and_264MB_write": whole,
                      "ratio_best_in_process": max(ru.values()) / max(hf.values())}
    print(json.dumps(res["capture"], indent=1))

if "embed" in parts:
    from sentence_transformers import SentenceTransformer
    import torch
    torch.set_num_threads(T)
    tt = titles()
    m = SentenceTransformer(minilm, device="cpu")
    m.encode(tt[:64], batch_size=64)
    times = []
    for _ in range(3):
        t0 = time.perf_counter(); st = m.encode(tt, batch_size=64); times.append(time.perf_counter() - t0)
    st_rate = len(tt) / statistics.median(times)
    rr = []
    for _ in range(3):
        p = rudder_json(["embed", "--model", minilm, "--input", item_file, "--column", "movie_title",
                         "--batch-size", "64", "--out", f"{tmp}/emb.safetensors"])
        rr.append(float(p.stderr.split("(")[2].split(" texts/s")[0]))
    from safetensors.numpy import load_file
    e = load_file(f"{tmp}/emb.safetensors")["embeddings"]
    cos = (e * st).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(st, axis=1))
    res["embed"] = {"texts": len(tt), "sentence_transformers_texts_s": st_rate,
                    "rudder_texts_s_in_process": statistics.median(rr), "ratio": statistics.median(rr) / st_rate,
                    "cosine_min_all": float(cos.min()), "cosine_min_first100": float(cos[:100].min())}
    print(json.dumps(res["embed"], indent=1))

json.dump(res, open(out_path, "w"), indent=1)
