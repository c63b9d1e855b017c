"""Markdown tables of bench/agent4rec.sh's runs beside the reference's stored gpt-3.5 runs.
usage: python3 bench/agent4rec_report.py OUT"""
import json
import os
import sys

out = sys.argv[1]
# LehengTHU/Agent4Rec storage/ml-1m/*/metrics.txt (5 pages x 4 items), gpt-3.5-turbo
ref = {
    "LightGCN (reference, 1,000 agents, gpt-3.5)": dict(
        recall=0.5028, precision=0.4155, click=0.3256, likes=1.973, exit=3.234),
    "MF (reference, 100 agents, gpt-3.5)": dict(
        recall=0.5015, precision=0.3700, click=0.3175, likes=1.954, exit=3.170),
}
print("| recommender | agents | exit page | watch rate | click rate (ref. def.) | likes/page | "
      "ALIGN precision (ref. \"recall\") | ALIGN recall (ref. \"precision\") | held-out share of shown | "
      "mean rating | satisfaction 1–10 | tokens/agent | calls/agent |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, r in ref.items():
    print(f"| {name} | — | {r['exit']:.3f} | — | {r['click']:.4f} | {r['likes']:.3f} | "
          f"{r['recall']:.4f} | {r['precision']:.4f} | — | — | — | ~6,906 | 8–9 |")
for n in ["lightgcn", "mf", "pop", "random"]:
    p = os.path.join(out, f"sim-{n}", "metrics.json")
    if not os.path.exists(p):
        print(f"| {n} | (not finished) |")
        continue
    m = json.load(open(p))["simulation"]
    # share of shown items that are the user's held-out (valid) items
    shown = gt = 0
    for line in open(os.path.join(out, f"sim-{n}", "behaviour.jsonl")):
        for pg in json.loads(line)["pages"]:
            shown += len(pg["items"])
            gt += len(pg["ground_truth"])
    fmt = lambda v: "–" if v is None else f"{v:.2f}"
    print(f"| {n} (SmolLM2-135M, log-prob, calibrated) | {m['agents']} | {m['exit_page']:.3f} | "
          f"{m['watch_rate']:.3f} | {m['click_rate']:.4f} | {m['likes_per_page']:.3f} | "
          f"{m['align_precision']:.4f} | {m['align_recall']:.4f} | {gt / max(shown, 1):.3f} | "
          f"{fmt(m['mean_rating'])} | {fmt(m['satisfaction'])} | {m['tokens_per_agent']:.0f} | "
          f"{m['calls_per_agent']:.1f} |")
print()
for n in ["lightgcn", "mf", "pop", "random"]:
    p = os.path.join(out, f"sim-{n}", "metrics.json")
    if os.path.exists(p):
        j = json.load(open(p))
        m = j["simulation"]
        print(f"- {n}: exit pages {m['exit_pages']}, ratings {m['rating_counts']}, interviews "
              f"{m['interview_counts']}, wall {j['wall_seconds']:.0f} s, "
              f"{j['llm']['prompt_tokens']} tokens read, {j['llm']['calls']} calls")
p = os.path.join(out, "disc", "metrics.json")
if os.path.exists(p):
    print()
    print("| ratio | agents | items/agent | accuracy | precision | recall | F1 | said yes |")
    print("|---|---|---|---|---|---|---|---|")
    for d in json.load(open(p))["discrimination"]:
        print(f"| 1:{d['ratio']} | {d['agents']} | {d['items_per_agent']:.1f} | {d['accuracy']:.3f} | "
              f"{d['precision']:.3f} | {d['recall']:.3f} | {d['f1']:.3f} | {d['yes_rate']:.3f} |")
