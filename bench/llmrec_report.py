#!/usr/bin/env python3
"""Table of a bench/llmrec_lastfm.sh output folder (markdown on stdout).
usage: llmrec_report.py OUT"""
import json, os, sys

out = sys.argv[1]
def load(name):
    p = os.path.join(out, name, "results.json")
    return json.load(open(p)) if os.path.exists(p) else None

rows = []
for m in ["sasrec", "gru4rec", "caser"]:
    r = load(m)
    if r:
        c = r["candidates"]
        rows.append((m.replace("sasrec", "SASRec").replace("gru4rec", "GRU4Rec").replace("caser", "Caser"),
                     f'{c["hit@1"]:.4f}', "1", "–", "–", f'{c["hit@5"]:.4f}', f'{c["ndcg@5"]:.4f}', r["candidate_questions"]))
for name, label in [("zero-shot", "SmolLM2 zero-shot"), ("sft", "+ SFT"), ("dpo", "+ SFT + DPO"), ("sdpo", "+ SFT + S-DPO")]:
    r = load(f"eval-{name}")
    if not r:
        continue
    g = r.get("generation", {})
    lk = r.get("likelihood", {})
    rows.append((label, f'{g.get("hr1", float("nan")):.4f}', f'{g.get("valid_ratio", float("nan")):.4f}',
                 f'{g.get("llara_hr1_given_valid", float("nan")):.4f}', f'{lk.get("hit@1", float("nan")):.4f}',
                 f'{lk.get("hit@5", float("nan")):.4f}', f'{lk.get("ndcg@5", float("nan")):.4f}', r["questions"]))
print("| model | HR@1 generated (hits / all) | ValidRatio | LLaRA hits / valid | HR@1 likelihood | HR@5 (likelihood / scores) | NDCG@5 | questions |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if r[0] in ("SASRec", "GRU4Rec", "Caser"):
        print(f"| {r[0]} | – | – | – | {r[1]} | {r[5]} | {r[6]} | {r[7]} |")
    else:
        print("| " + " | ".join(str(x) for x in r) + " |")
print()
for m in ["sft", "dpo", "sdpo"]:
    r = load(m)
    if r:
        print(f'- {m}: {r["train_examples"]} examples, {r["steps"]} steps, best validation loss {r["best_val_loss"]:.4f} at step {r["best_step"]}, {r["seconds_per_step"]:.1f} s/step, {r["tokens_per_s"]:.0f} tokens/s')
