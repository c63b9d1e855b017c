#!/bin/bash
# Agent4Rec with the in-process SmolLM2-135M: the recommender ordering (LightGCN, MF, popularity,
# random) and the taste-discrimination test, as measured for docs/benchmarks.md.
#   bench/agent4rec.sh [OUT] [AGENTS]
# Two simulations run side by side with one thread each (the quantized prefill gains only 1.4×
# from a second thread on two cores, two processes gain 2×). Resumable: run it again after an
# interruption and every run continues from its journal; run it with a larger AGENTS and the
# finished runs grow to that many agents.
set -euo pipefail
OUT=${1:-bench/out/agent4rec}
N=${2:-30}
D=${RUDDER_SHARED_DATA:-../shared/data}/agent4rec-ml1m
R=${RUDDER:-target/fast/rudder}
mkdir -p "$OUT"
for m in lightgcn mf; do
  extra=""; [ $m = lightgcn ] && extra="--layers 2"
  [ -f "$OUT/cf-$m/summary.md" ] || $R cf train --data "$D" --model $m --loss bpr --dim 64 --lr 5e-4 \
    --batch-size 2048 --reg 1e-5 $extra --epochs 600 --eval-every 5 --patience 20 --ks 20 --seed 101 \
    --out "$OUT/cf-$m"
done
sim() { # NAME RECOMMENDER
  if [ -f "$OUT/sim-$1/metrics.json" ] && grep -q "^agents = $N\$" "$OUT/sim-$1/config.toml"; then return; fi
  if [ -f "$OUT/sim-$1/journal.jsonl" ]; then
    # continue an interrupted run, or grow a finished one to N agents (kept agents are replayed)
    $R --threads 1 sim agent4rec --resume "$OUT/sim-$1" --extend-to "$N" --concurrency 8
  else
    $R --threads 1 sim agent4rec --data "$D" --recommender "$2" --agents "$N" --pages 5 --per-page 4 \
      --decisions logprob --concurrency 8 --out "$OUT/sim-$1"
  fi
}
( sim lightgcn "$OUT/cf-lightgcn"; sim mf "$OUT/cf-mf" ) > "$OUT/a.log" 2>&1 &
( sim random random; sim pop pop
  [ -f "$OUT/disc/metrics.json" ] || $R --threads 1 sim agent4rec --data "$D" --recommender pop --agents 20 \
    --mode discriminate --ratios 1,3,9 --decisions logprob --concurrency 8 --out "$OUT/disc" ) > "$OUT/b.log" 2>&1 &
wait
python3 bench/agent4rec_report.py "$OUT"
