#!/usr/bin/env bash
# AdvDrop vs LightGCN (BPR) on ML-1M (rating ≥ 4) with the in-distribution test and a
# popularity-flattened OOD test (10% of interactions drawn ∝ pop^-1, cf-seeds.md §3.5; the same
# split as bench/advinfonce_ml1m.sh). d=64, 2 layers, lr 5e-3, batch 8192, reg 1e-5, EPOCHS
# epochs, eval every 5; AdvDrop: ARM phase every 5 epochs × 1 pass, adv_lr 1e-2.
# usage: bench/advdrop_ml1m.sh [EPOCHS] [SEED]   (a SEED reruns AdvDrop only, into ml1m-advdrop-sSEED)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-30}"
SEED="${2:-}"
OUT=bench/out
cargo build --release -q -p rudder
R="target/release/rudder --threads 2"
[ -f "$OUT/ml-1m-ood/test_ood.txt" ] || $R data split ml-1m --min-rating 4 --ood-fraction 0.1 --ood-gamma 1.0 --seed 2020 --out "$OUT/ml-1m-ood" > /dev/null
common=(--data "$OUT/ml-1m-ood" --loss bpr --reg 1e-5 --lr 5e-3 --batch-size 8192 --dim 64 --layers 2 --epochs "$EPOCHS" --eval-every 5 --patience 0 --ks 20)
if [ -n "$SEED" ]; then
  $R cf train "${common[@]}" --model advdrop --adv-interval 5 --adv-epochs 1 --adv-lr 1e-2 --seed "$SEED" --out "$OUT/ml1m-advdrop-s$SEED" > /dev/null
  runs=("$OUT/ml1m-advdrop-s$SEED")
else
  $R cf train "${common[@]}" --model lightgcn --out "$OUT/ml1m-lightgcn-bpr" > /dev/null
  $R cf train "${common[@]}" --model advdrop --adv-interval 5 --adv-epochs 1 --adv-lr 1e-2 --out "$OUT/ml1m-advdrop" > /dev/null
  runs=("$OUT/ml1m-lightgcn-bpr" "$OUT/ml1m-advdrop")
fi
for r in "${runs[@]}"; do f="$r/summary.md"; echo "== $f"; sed -n 3p "$f"; grep '^| valid\|^| test\|Spearman' "$f"; done
