#!/usr/bin/env bash
# AgentRecBench on ML-1M (docs/benchmarks.md, "AgentRecBench on ML-1M"): the record store, the
# five scenarios, the classical recommenders on every scenario, the language-model agents on the
# in-process SmolLM2-135M-Instruct (recorded into OUT/llm-cache.jsonl, so a second run replays
# them for free), the reference's example tasks, and the scenario × recommender table.
#
# usage: bench/agentrec.sh OUT [LLM_TASKS=30] [EXAMPLES=path/to/AgentSocietyChallenge/example/track2]
set -euo pipefail
OUT=${1:?usage: bench/agentrec.sh OUT [LLM_TASKS] [EXAMPLES]}
N=${2:-30}
EX=${3:-}
R=${RUDDER:-target/release/rudder}
mkdir -p "$OUT/runs"
$R bench agentrec store --data ml-1m
for s in classic long short user-cold item-cold; do
  [ -d "$OUT/ml1m-$s" ] || $R bench agentrec build --data ml-1m --scenario $s --tasks 500 --seed 2025 --out "$OUT/ml1m-$s"
done
run() { # name args…: skips finished runs, so the script resumes
  local name=$1; shift
  [ -f "$OUT/runs/$name/metrics.json" ] && return
  rm -rf "$OUT/runs/$name"
  /usr/bin/time -f "%e s %M KB" $R bench agentrec run "$@" --out "$OUT/runs/$name" > "$OUT/runs/$name.log" 2>&1
}
for s in classic long short user-cold item-cold; do
  for a in identity random pop mf; do run $s-$a --tasks "$OUT/ml1m-$s" --agent $a --cf-epochs 40; done
  run $s-lightgcn --tasks "$OUT/ml1m-$s" --agent lightgcn --cf-epochs 15
done
C=--llm-cache=$OUT/llm-cache.jsonl
run classic-selective-lp --tasks "$OUT/ml1m-classic" --agent selective --decisions logprob --limit $N $C
run classic-agent4rec-lp --tasks "$OUT/ml1m-classic" --agent agent4rec --decisions logprob --limit $N $C
run classic-baseline-lp --tasks "$OUT/ml1m-classic" --agent baseline --decisions logprob --limit $N $C
run classic-memory-lp --tasks "$OUT/ml1m-classic" --agent memory --embedder hash --decisions logprob --limit $N $C
run classic-selective-text --tasks "$OUT/ml1m-classic" --agent selective --max-tokens 200 --limit 20 $C
run classic-cot --tasks "$OUT/ml1m-classic" --agent cot --max-tokens 200 --limit 10 $C
run classic-planner --tasks "$OUT/ml1m-classic" --agent planner --max-tokens 200 --limit 10 $C
run user-cold-selective-lp --tasks "$OUT/ml1m-user-cold" --agent selective --decisions logprob --limit $N $C
run item-cold-selective-lp --tasks "$OUT/ml1m-item-cold" --agent selective --decisions logprob --limit $N $C
if [ -n "$EX" ]; then
  for d in amazon goodreads yelp; do $R bench agentrec inspect --tasks "$EX/$d" | head -2; done
fi
python3 - "$OUT/runs" <<'PY'
import json, os, sys
d = sys.argv[1]
rows = {}
for name in sorted(os.listdir(d)):
    p = os.path.join(d, name, "metrics.json")
    if not os.path.exists(p):
        continue
    m = json.load(open(p))
    for s in ["user-cold", "item-cold", "classic", "long", "short"]:
        if name.startswith(s + "-"):
            rows.setdefault(name[len(s) + 1:], {})[s] = m
            break
scen = ["classic", "long", "short", "user-cold", "item-cold"]
print("| recommender | " + " | ".join(scen) + " |")
print("|---|" + "---|" * len(scen))
for r, by in rows.items():
    cells = []
    for s in scen:
        m = by.get(s)
        cells.append("–" if m is None else f"{m['hr1']:.3f} / {m['hr3']:.3f} / {m['hr5']:.3f} (n={m['tasks']})")
    print(f"| {r} | " + " | ".join(cells) + " |")
PY
