#!/usr/bin/env python3
"""Tables of a bench/ilora_lastfm.sh output folder (markdown on stdout).
usage: ilora_report.py OUT"""
import json, os, re, sys

out = sys.argv[1]
def load(name, f="results.json"):
    p = os.path.join(out, name, f)
    return json.load(open(p)) if os.path.exists(p) else None

def rss_mb(name):
    p = os.path.join(out, name + ".log")
    if not os.path.exists(p):
        return float("nan")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(p).read())
    return int(m.group(1)) / 1024 if m else float("nan")

f = lambda x: "–" if x is None else f"{x:.4f}"
print("| model | HR@1 generated (correct / all) | ValidRatio | HR@1 given valid (LLaRA's test_hr) | HR@1 likelihood | HR@5 | NDCG@5 | questions |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
s = load("sasrec")
if s:
    c = s["candidates"]
    print(f"| SASRec (scores of the candidates) | – | 1 | – | {f(c['hit@1'])} | {f(c['hit@5'])} | {f(c['ndcg@5'])} | {s['candidate_questions']} |")
for name, label in [("sft", "LoRA SFT, text prompts"), ("llara", "LLaRA: hybrid prompts, one LoRA"),
                    ("ilora4", "iLoRA: hybrid prompts, 4 experts")]:
    r = load(f"eval-{name}")
    if not r:
        continue
    g, lk = r.get("generation", {}), r.get("likelihood", {})
    print(f"| {label} | {f(g.get('llara_hr1'))} | {f(g.get('llara_valid_ratio'))} | {f(g.get('llara_hr1_given_valid'))} | "
          f"{f(lk.get('hit@1'))} | {f(lk.get('hit@5'))} | {f(lk.get('ndcg@5'))} | {r['questions']} |")
print()
print("| run | examples | steps | s/step | tokens/s | best validation loss (step) | peak RSS |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in ["sft", "llara", "ilora4", "abl-k1", "abl-k2", "abl-k4", "abl-k8"]:
    r = load(name)
    if r:
        print(f"| {name} | {r['train_examples']} | {r['steps']} | {r['seconds_per_step']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['best_val_loss']:.4f} ({r['best_step']}) | {rss_mb(name):.0f} MB |")
print()
print("| experts K | HR@1 likelihood | HR@5 | NDCG@5 | best validation loss | gate entropy (max ln K) |")
print("|---:|---:|---:|---:|---:|---:|")
for k in [1, 2, 4, 8]:
    r, t = load(f"eval-abl-k{k}"), load(f"abl-k{k}")
    if not r:
        continue
    lk = r.get("likelihood", {})
    gt = r.get("gates")
    ent = f"{gt['mean_entropy']:.3f} ({gt['max_entropy']:.3f})" if gt else "–"
    print(f"| {k} | {f(lk.get('hit@1'))} | {f(lk.get('hit@5'))} | {f(lk.get('ndcg@5'))} | {t['best_val_loss']:.4f} | {ent} |")
