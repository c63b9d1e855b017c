#!/usr/bin/env python3
"""AlphaSteer's fit against NumPy (and PyTorch when importable), following the reference's own
algorithm literally (reference/steering-seeds.md §3.6–3.7): per layer, the uncentred benign
Gram matrix G = HbᵀHb, its SVD, Q = the k = ⌊d·p⌋ singular vectors of the smallest singular
values, P = QQᵀ, X = Hm·P, Y = repeat(r), Δ̃ = pinv(XᵀX + α·PᵀP)·XᵀY, S = P·Δ̃ (d×d, f64).
rudder stores S as u·rᵀ (two vectors); the check compares the full matrices.

check  STEER.safetensors BENIGN_ACTS.safetensors HARMFUL_ACTS.safetensors
    rel ‖S_numpy − u rᵀ‖ / ‖S_numpy‖ per layer, k equal, r equal, seconds per layer (NumPy,
    PyTorch) against rudder's own (from the steering file's report).
synth  OUT_DIR D NB NM
    Synthetic activation sets (benign: NB rows, malicious: NM rows, width D, one resid_pre
    site) in rudder's activation-set format, for the d = 4096 timing.
"""
import json, sys, time
import numpy as np


def load_acts(path):
    from safetensors.numpy import load_file
    idx = json.load(open(path + ".json"))
    return load_file(path), idx


def reference_fit(hb, hm, r, k, alpha):
    d = hb.shape[1]
    t0 = time.perf_counter()
    g = hb.T @ hb
    u, s, _ = np.linalg.svd(g)           # descending singular values
    q = u[:, d - k:]                     # the k smallest
    p = q @ q.T
    x = hm @ p
    y = np.repeat(r[None, :], hm.shape[0], axis=0)
    a = x.T @ x + alpha * (p.T @ p)
    dt = np.linalg.pinv(a, rcond=max(a.shape) * np.finfo(np.float64).eps) @ (x.T @ y)
    smat = p @ dt
    return smat, time.perf_counter() - t0


def torch_fit(hb, hm, r, k, alpha):
    import torch
    torch.set_num_threads(2)
    hb, hm, r = torch.from_numpy(hb), torch.from_numpy(hm), torch.from_numpy(r)
    d = hb.shape[1]
    t0 = time.perf_counter()
    g = hb.T @ hb
    u, s, _ = torch.linalg.svd(g)
    q = u[:, d - k:]
    p = q @ q.T
    x = hm @ p
    y = r.unsqueeze(0).expand(hm.shape[0], -1)
    a = x.T @ x + alpha * (p.T @ p)
    smat = p @ (torch.linalg.pinv(a) @ (x.T @ y))
    return smat.numpy(), time.perf_counter() - t0


def check(steer, benign, harmful):
    from safetensors.numpy import load_file
    st = load_file(steer)
    meta = json.load(open(steer + ".json"))
    xb, _ = load_acts(benign)
    xh, _ = load_acts(harmful)
    alpha = meta["meta"]["fit"]["alpha"]
    rudder_secs = {r["layer"]: r["seconds"] for r in meta["meta"].get("report", [])}
    try:
        import torch  # noqa: F401
        have_torch = True
    except Exception:
        have_torch = False
    rows = []
    for lay in meta["layers"]:
        l, k = lay["layer"], lay["k"]
        site = f"blocks.{l}.hook_resid_pre"
        hb, hm = xb[site].astype(np.float64), xh[site].astype(np.float64)
        d = hb.shape[1]
        r = hm.mean(0) - hb.mean(0)
        u_r = st[f"layer.{l}.gate"].astype(np.float64)
        r_r = st[f"layer.{l}.vector"].astype(np.float64)
        s_np, t_np = reference_fit(hb, hm, r, k, alpha)
        s_r = np.outer(u_r, r_r)
        sv = np.linalg.svd(s_np, compute_uv=False) if d <= 1024 else np.array([1.0, float("nan")])
        row = {"layer": l, "d": d, "k": k, "k_numpy": int(np.floor(d * lay["p"])) if lay.get("p") else None,
               "rel_matrix_diff": float(np.linalg.norm(s_np - s_r) / np.linalg.norm(s_np)),
               "rel_vector_diff": float(np.linalg.norm(r - r_r) / np.linalg.norm(r)),
               "rank1_rel_residual": float(sv[1] / sv[0]),
               "seconds_numpy": t_np, "seconds_rudder": rudder_secs.get(l)}
        if have_torch:
            s_t, t_t = torch_fit(hb, hm, r, k, alpha)
            row["seconds_torch"] = t_t
            row["rel_matrix_diff_torch"] = float(np.linalg.norm(s_t - s_r) / np.linalg.norm(s_t))
        rows.append(row)
    out = {"layers": rows, "max_rel_matrix_diff": max(x["rel_matrix_diff"] for x in rows),
           "seconds_numpy": sum(x["seconds_numpy"] for x in rows),
           "seconds_rudder": sum(x["seconds_rudder"] or 0 for x in rows)}
    if have_torch:
        out["seconds_torch"] = sum(x["seconds_torch"] for x in rows)
    out["ratio_numpy_over_rudder"] = out["seconds_numpy"] / max(out["seconds_rudder"], 1e-9)
    print(json.dumps({k: v for k, v in out.items() if k != "layers"}))
    for x in rows:
        print(json.dumps(x))
    return out


def synth(out_dir, d, nb, nm):
    import os
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    # benign rows: strong variance in a random half of the directions, weak elsewhere
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = np.where(np.arange(d) < d // 2, 3.0, 0.05)
    for name, n, shift in [("benign", nb, 0.0), ("harmful", nm, 1.0)]:
        z = rng.standard_normal((n, d)) * scale
        z[:, d // 2:] += shift
        x = (z @ basis.T).astype(np.float32)
        path = f"{out_dir}/{name}.safetensors"
        save_file({"blocks.0.hook_resid_pre": x}, path)
        json.dump({"format": "rudder-activations-v1", "sites": ["blocks.0.hook_resid_pre"], "hidden_size": d,
                   "rows": [{"prompt": i, "position": 0} for i in range(n)], "labels": None, "meta": {"synthetic": True}},
                  open(path + ".json", "w"))


if __name__ == "__main__":
    if sys.argv[1] == "check":
        res = check(sys.argv[2], sys.argv[3], sys.argv[4])
        json.dump(res, open(sys.argv[2] + ".numpy.json", "w"), indent=1)
    elif sys.argv[1] == "synth":
        synth(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
