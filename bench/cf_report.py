"""Print the rudder-vs-RecBole table (markdown) from bench/out."""
import json, re, sys

out = sys.argv[1]

def rss(path):
    for line in open(path):
        if "Maximum resident set size" in line:
            return int(line.split()[-1]) / 1024
    return float("nan")

def rudder(name):
    recs = [json.loads(l) for l in open(f"{out}/rudder-{name}/metrics.jsonl")]
    epochs = [r for r in recs if "epoch" in r]
    last = max((r["valid"] for r in epochs), key=lambda v: v["recall@20"])
    return {
        "epoch": sum(r["seconds"] for r in epochs) / len(epochs),
        "eval": sum(r["eval_seconds"] for r in epochs if "eval_seconds" in r) / len(epochs),
        "rss": rss(f"{out}/rudder-{name}.time"),
        "recall": last["recall@20"],
        "ndcg": last["ndcg@20"],
        "epochs": len(epochs),
    }

def recbole(name):
    d = json.load(open(f"{out}/recbole-{name}.json"))
    rec, nd = d["best_valid"]["recall@20"], d["best_valid"]["ndcg@20"]
    return {"epoch": d["seconds_per_epoch"], "eval": d["seconds_per_eval"], "rss": rss(f"{out}/recbole-{name}.time"),
            "recall": rec, "ndcg": nd, "epochs": d["epochs"]}

print("| model | tool | epochs | s/epoch | s/full eval | peak RSS MB | best valid Recall@20 | its valid NDCG@20 |")
print("|---|---|---|---|---|---|---|---|")
for ours, theirs, label in [("lightgcn", "LightGCN", "LightGCN"), ("mf", "BPR", "BPR-MF")]:
    a, b = rudder(ours), recbole(theirs)
    for tool, r in [("RecBole 1.2.1", b), ("rudder", a)]:
        print(f"| {label} | {tool} | {r['epochs']} | {r['epoch']:.2f} | {r['eval']:.3f} | {r['rss']:.0f} | {r['recall']:.4f} | {r['ndcg']:.4f} |")
    print(f"| {label} | **ratio rudder/RecBole** | | **{a['epoch']/b['epoch']:.3f}×** | **{a['eval']/b['eval']:.3f}×** | **{a['rss']/b['rss']:.2f}×** | {a['recall']/b['recall']:.3f}× | {a['ndcg']/b['ndcg']:.3f}× |")
