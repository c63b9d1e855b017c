"""Summarise bench/advinfonce_ref.sh runs: the reference's stats log and rudder's run folders.

usage: python bench/advinfonce_ref_report.py bench/out/advinfonce_ref/<dataset>-<backbone>
Prints one row per run and mean ± sd per system (Markdown), and writes summary.json beside.
"""
import json, re, statistics, sys
from pathlib import Path


def ref_run(path):
    text = path.read_text()
    epochs = [(int(m[1]), float(m[2]), float(m[3])) for m in
              re.finditer(r"^Epoch (\d+) \[([\d.]+)s\]: train==\[([-\d.e]+)=", text, re.M)]
    adv = [float(m[1]) for m in re.finditer(r"^AdvEpoch \d+/\d+ \[([\d.]+)s\]", text, re.M)]
    etas = re.findall(r"^mean_eta\t\[(.*)\]$", text, re.M)
    num = lambda x: float(re.sub(r"np\.float\d+\((.*)\)", r"\1", x.strip()))
    eta = [num(x) for x in etas[-1].split(",")] if etas else []
    best = re.findall(r"The best epoch is\s+(\d+)", text)
    evals = re.findall(r"^(valid|test_id|test_ood):(\{.*\})$", text, re.M)
    # the final block (after "The best epoch") is the restored best model's evaluation
    tail = text.rsplit("The best epoch is", 2)
    final = dict(re.findall(r"^(valid|test_id|test_ood):(\{.*\})$", tail[1] if len(tail) > 1 else "", re.M))
    get = lambda d, k: float(re.search(rf"'{k}': (?:np\.float32\()?([\d.e-]+)", d)[1]) if d else float("nan")
    return {
        "epochs": len(epochs),
        "best_epoch": int(best[0]) + 1 if best else None,
        "loss": [e[2] for e in epochs],
        "sec_epoch": statistics.mean(e[1] for e in epochs) if epochs else float("nan"),
        "sec_adv": statistics.mean(adv) if adv else None,
        "adv_passes": len(adv),
        "kl": eta,
        "valid_recall": get(final.get("valid"), "recall"),
        "valid_ndcg": get(final.get("valid"), "ndcg"),
        "test_recall": get(final.get("test_ood"), "recall"),
        "test_ndcg": get(final.get("test_ood"), "ndcg"),
    }


def rudder_run(d):
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    ep = [l for l in lines if "epoch" in l]
    tests = {l["split"]: l for l in lines if "split" in l}
    best = next((l.get("best_epoch") for l in lines if "split" in l), None)
    valid = next((l["valid"] for l in ep if l["epoch"] == best and "valid" in l), {})
    t = tests.get("test_ood") or tests.get("test") or {}
    adv = [l["adv_seconds"] for l in ep if "adv_seconds" in l]
    # main-pass seconds only, as the reference logs them (its Epoch line excludes the adversarial pass)
    main = [l["seconds"] - l.get("adv_seconds", 0.0) for l in ep]
    return {
        "epochs": len(ep),
        "best_epoch": best + 1 if best is not None else None,
        "loss": [l["loss"] for l in ep],
        "sec_epoch": statistics.mean(main) if main else float("nan"),
        "sec_adv": statistics.mean(adv) if adv else None,
        "adv_passes": len(adv),
        "kl": [l["adv_kl"] for l in ep if "adv_kl" in l],
        "valid_recall": valid.get("recall@20", float("nan")),
        "valid_ndcg": valid.get("ndcg@20", float("nan")),
        "test_recall": t.get("recall@20", float("nan")),
        "test_ndcg": t.get("ndcg@20", float("nan")),
    }


def main(out):
    out = Path(out)
    runs = {}
    for p in sorted(out.glob("ref-*.log")):
        if "The best epoch is" not in p.read_text():
            continue  # unfinished
        runs.setdefault("reference", []).append((p.stem.split("-")[1], ref_run(p)))
    for d in sorted(out.glob("rudder-*-*")):
        if (d / "summary.md").exists():
            _, mode, seed = d.name.split("-")
            runs.setdefault(f"rudder {mode}", []).append((seed, rudder_run(d)))
    print("| system | seed | epochs (best) | loss ep 1 → 5 → last | KL after passes (first … last) | valid R@20 | test R@20 | test N@20 | s/epoch (main) | s/adv pass |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sysname, rs in runs.items():
        for seed, r in rs:
            l = r["loss"]
            kl = r["kl"]
            print(f"| {sysname} | {seed} | {r['epochs']} ({r['best_epoch']}) | "
                  f"{l[0]:.4f} → {l[min(4, len(l)-1)]:.4f} → {l[-1]:.4f} | "
                  f"{(f'{kl[0]:.4f} … {kl[-1]:.4f} ({len(kl)})' if kl else '—')} | "
                  f"{r['valid_recall']:.4f} | {r['test_recall']:.4f} | {r['test_ndcg']:.4f} | "
                  f"{r['sec_epoch']:.3f} | {r['sec_adv'] if r['sec_adv'] is None else round(r['sec_adv'], 3)} |")
    print()
    print("| system | runs | valid R@20 | test R@20 | test N@20 | s/epoch |")
    print("|---|---|---|---|---|---|")
    summ = {}
    for sysname, rs in runs.items():
        def ms(k):
            v = [r[k] for _, r in rs]
            return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)
        s = {k: ms(k) for k in ["valid_recall", "test_recall", "test_ndcg", "sec_epoch"]}
        summ[sysname] = s
        print(f"| {sysname} | {len(rs)} | " + " | ".join(
            f"{m:.4f} ± {sd:.4f}" if k != "sec_epoch" else f"{m:.3f}" for k, (m, sd) in s.items()) + " |")
    (out / "summary.json").write_text(json.dumps({"runs": {k: dict(v) for k, v in runs.items()}, "summary": summ}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
