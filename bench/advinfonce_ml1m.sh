#!/usr/bin/env bash
# InfoNCE vs AdvInfoNCE on ML-1M (rating ≥ 4) with an in-distribution test and a
# popularity-shifted OOD test (10% of interactions drawn ∝ pop^-1, at most half of any item's),
# MF and LightGCN (2 layers); d=64, batch 2048, N=64, τ=0.2, lr 1e-3; AdvInfoNCE: adv_lr 5e-5,
# 7 passes every 5 epochs (the Tencent row of the reference README); 40 epochs, eval every 5.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out
cargo build --release -q -p rudder
R=target/release/rudder
[ -f "$OUT/ml-1m-ood/test_ood.txt" ] || $R data split ml-1m --min-rating 4 --ood-fraction 0.1 --ood-gamma 1.0 --seed 2020 --out "$OUT/ml-1m-ood" > /dev/null
common=(--data "$OUT/ml-1m-ood" --lr 1e-3 --batch-size 2048 --n-neg 64 --tau 0.2 --epochs 40 --eval-every 5 --patience 4 --ks 20)
for m in mf lightgcn; do
  layers=$([ $m = mf ] && echo 0 || echo 2)
  $R cf train "${common[@]}" --model $m --layers $layers --loss infonce --out "$OUT/ml1m-$m-infonce" > /dev/null
  $R cf train "${common[@]}" --model $m --layers $layers --loss advinfonce --adv-lr 5e-5 --eta-epochs 7 --adv-interval 5 --out "$OUT/ml1m-$m-advinfonce" > /dev/null
done
for f in "$OUT"/ml1m-*-*nce/summary.md; do echo "== $f"; sed -n 3p "$f"; grep '^| valid\|^| test' "$f"; done
