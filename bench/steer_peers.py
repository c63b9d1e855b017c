#!/usr/bin/env python3
"""Peer checks of rudder steer (run by bench/steer_peers.sh):

probes  ACTS.safetensors RUDDER_PROBE_DIR TARGETS.json ALPHA
    The same activation matrices and split fitted with scikit-learn (Lasso(alpha) with a tight
    tolerance, Ridge(alpha)): relative coefficient difference ||w_rudder − w_sk|| / ||w_sk||,
    test Spearman of both, seconds per layer of both.
cvec    F32.gguf CONTROL_VECTOR.gguf RUDDER_DUMP.safetensors STRENGTH IDS.json
    llama.cpp (llama-cpp-python) with the control vector applied through llama_apply_adapter_cvec
    (buffer built as llama.cpp's loader builds it: direction.k at offset (k−1)·n_embd),
    teacher-forced on IDS; the logits against rudder's `lm dump --interventions` of the same
    vector on the same f32 GGUF.
capture F32.gguf ACTS.safetensors QUESTIONS.json
    Hugging Face transformers on the same f32 GGUF: the capture's prompts rendered with the
    tokenizer's own chat template (apply_chat_template, generation prompt added), every
    output_hidden_states[l][:, -1] against `rudder steer capture --sites hf` of the same model
    (relative error per prompt and layer; token counts compared).
f32     Q.gguf OUT_F32.gguf
    Dequantize every tensor of a GGUF to f32 (gguf package), keeping the metadata.
"""
import json, sys, time
import numpy as np


def probes(acts, rdir, targets_path, alpha):
    from safetensors.numpy import load_file
    from sklearn.linear_model import Lasso, Ridge
    from scipy.stats import spearmanr
    x = load_file(acts)
    r = json.load(open(f"{rdir}/probes.json"))
    rw = load_file(f"{rdir}/probes.safetensors")
    tv = json.load(open(targets_path))
    y = np.array([t["mean_reasoning_tokens"] if isinstance(t, dict) else float(t) for t in tv], dtype=np.float64)
    tr, te = np.array(r["split"]["train"]), np.array(r["split"]["test"])
    kind = r["probe"]["kind"]
    rows = []
    for lay in r["layers"]:
        site = lay["site"]
        X = x[site].astype(np.float64)
        t0 = time.perf_counter()
        if kind == "lasso":
            m = Lasso(alpha=alpha, tol=r["probe"]["tol"], max_iter=r["probe"]["max_iter"]).fit(X[tr], y[tr])
        else:
            m = Ridge(alpha=alpha).fit(X[tr], y[tr])
        dt = time.perf_counter() - t0
        w_s = m.coef_
        w_r = rw[f"{site}.coef"].astype(np.float64)
        den = max(np.linalg.norm(w_s), 1e-300)
        rel = float(np.linalg.norm(w_r - w_s) / den) if np.linalg.norm(w_s) > 0 else float(np.linalg.norm(w_r))
        p_s = m.predict(X[te])
        p_r = X[te] @ w_r + float(rw[f"{site}.intercept"][0])
        rows.append({"site": site, "rel_coef_diff": rel, "intercept_diff": float(abs(m.intercept_ - rw[f"{site}.intercept"][0])),
                     "nonzero_sklearn": int((w_s != 0).sum()), "nonzero_rudder": int((w_r != 0).sum()),
                     "test_spearman_sklearn": float(spearmanr(y[te], p_s)[0]), "test_spearman_rudder": float(spearmanr(y[te], p_r)[0]),
                     "seconds_sklearn": dt, "seconds_rudder": lay["seconds"]})
    out = {"kind": kind, "alpha": alpha, "rows": rows,
           "max_rel_coef_diff": max(x["rel_coef_diff"] for x in rows),
           "seconds_sklearn": sum(x["seconds_sklearn"] for x in rows),
           # the wall time of all fits (sites run side by side) when recorded, else the per-site sum
           "seconds_rudder": r.get("seconds") or sum(x["seconds_rudder"] for x in rows)}
    out["ratio_time"] = out["seconds_rudder"] / out["seconds_sklearn"]
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    return out


def f32(src, dst):
    import gguf
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"]
    w = gguf.GGUFWriter(dst, bytes(arch.parts[arch.data[0]]).decode())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.ARRAY:
            sub = f.types[1]
            if sub == gguf.GGUFValueType.STRING:
                vals = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
            else:
                vals = [f.parts[i].tolist()[0] for i in f.data]
            w.add_array(k, vals)
        elif t == gguf.GGUFValueType.STRING:
            w.add_string(k, bytes(f.parts[f.data[0]]).decode("utf-8", "replace"))
        else:
            w.add_key_value(k, f.parts[f.data[0]].tolist()[0], t)
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, a.reshape([int(d) for d in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def cvec(model, cv, rudder_dump, strength, ids_path):
    import ctypes, gguf, llama_cpp
    from llama_cpp import Llama
    from safetensors.numpy import load_file
    ids = json.load(open(ids_path))
    llm = Llama(model_path=model, n_threads=2, n_ctx=512, logits_all=True, verbose=False)
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_n_layer(llm.model)
    rd = gguf.GGUFReader(cv)
    buf = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    for t in rd.tensors:
        k = int(t.name.split(".")[1])
        buf[(k - 1) * n_embd:k * n_embd] += strength * np.asarray(t.data, dtype=np.float32)
    def run(apply):
        llm.reset()
        if apply:
            rc = llama_cpp.llama_apply_adapter_cvec(llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, n_embd, 1, n_layer - 1)
        else:
            rc = llama_cpp.llama_apply_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
        assert rc == 0, rc
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    base, steered = run(False), run(True)
    r = load_file(rudder_dump)["logits"]
    rel = float(np.abs(r - steered).max() / np.abs(steered).max())
    eff_l = steered - base
    out = {"max_abs_diff": float(np.abs(r - steered).max()), "max_rel_diff": rel,
           "steering_effect_max_abs": float(np.abs(eff_l).max()),
           "top1_agreement": float((r.argmax(-1) == steered.argmax(-1)).mean()),
           "positions": len(ids)}
    print(json.dumps(out))
    return out


def capture(model, acts, questions):
    import os, torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    idx = json.load(open(acts + ".json"))
    meta = idx["meta"]["meta"]
    rend = meta["rendering"]
    qs = json.load(open(questions))
    chosen = meta.get("chosen") or list(range(len(idx["rows"])))
    x = load_file(acts)
    d, f = os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    worst, len_mismatch, per_site = 0.0, 0, {}
    for row_i, row in enumerate(idx["rows"]):
        q = qs[chosen[row["prompt"]]]
        text = rend["template"].replace("{problem}", q["problem"])
        msgs = ([{"role": "system", "content": rend["system"]}] if rend.get("system") else []) + [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        if hasattr(ids, "input_ids"): ids = ids["input_ids"]
        ids = list(ids)
        if len(ids) != row["position"] + 1:
            len_mismatch += 1
        with torch.inference_mode():
            o = m(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
        for si, site in enumerate(idx["sites"]):
            h = o.hidden_states[si][0, -1].numpy()
            r = x[site][row_i]
            e = float(np.linalg.norm(r - h) / max(np.linalg.norm(h), 1e-12))
            per_site[site] = max(per_site.get(site, 0.0), e)
            worst = max(worst, e)
    out = {"prompts": len(idx["rows"]), "sites": len(idx["sites"]), "max_rel_err": worst,
           "token_count_mismatches": len_mismatch, "worst_site": max(per_site, key=per_site.get)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "probes":
        res = probes(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
        json.dump(res, open(f"{sys.argv[3]}/sklearn.json", "w"), indent=1)
    elif cmd == "capture":
        res = capture(sys.argv[2], sys.argv[3], sys.argv[4])
        json.dump(res, open(sys.argv[3] + ".hf.json", "w"), indent=1)
    elif cmd == "f32":
        f32(sys.argv[2], sys.argv[3])
    elif cmd == "cvec":
        cvec(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6])
