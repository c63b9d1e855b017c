#!/usr/bin/env bash
# Quality checks of the CF engine (docs/benchmarks.md): on Coat (../shared/data/cf/coat) and
# ML-100K (wheel), MF vs LightGCN vs most-popular on validation Recall@20, and InfoNCE vs
# AdvInfoNCE on Coat with the AdvInfoNCE README hyper-parameters.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out/quality
SHARED="${RUDDER_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
mkdir -p "$OUT"
cargo build --release -q -p rudder
R=target/release/rudder
C="$SHARED/cf/coat"
row() { printf "| %s | %s | %s |\n" "$1" "$(grep '^| valid' "$2/summary.md" | cut -d'|' -f3 | tr -d ' ')" "$(grep '^| test ' "$2/summary.md" | cut -d'|' -f3 | tr -d ' ')"; }
pop() { $R demo --data "$1" --eval-split "$2" --epochs 0 --out "$OUT/pop-$3-$2" | grep '^| most-popular' | cut -d'|' -f3 | tr -d ' '; }
echo "Coat: most-popular valid Recall@20 $(pop "$C" valid coat), test $(pop "$C" test coat)"
echo "| Coat run | valid Recall@20 (best) | test Recall@20 |"
echo "|---|---|---|"
for m in mf lightgcn; do
  L=$([ $m = mf ] && echo 0 || echo 2)
  $R cf train --data "$C" --model $m --layers $L --loss bpr --lr 1e-3 --batch-size 1024 --epochs 2000 --eval-every 5 --patience 10 --ks 20 --out "$OUT/coat-$m-bpr" > /dev/null
  row "$m BPR" "$OUT/coat-$m-bpr"
  for loss in infonce advinfonce; do
    $R cf train --data "$C" --preset $loss-coat-$m --out "$OUT/coat-$m-$loss" > /dev/null
    row "$m $loss (preset $loss-coat-$m)" "$OUT/coat-$m-$loss"
  done
done
echo
echo "ML-100K: most-popular valid Recall@20 $(pop ml-100k valid ml100k), test $(pop ml-100k test ml100k)"
echo "| ML-100K run | valid Recall@20 (best) | test Recall@20 |"
echo "|---|---|---|"
for lr in 1e-3 5e-3; do
  for p in recbole-bpr recbole-lightgcn; do
    $R cf train --data ml-100k --preset $p --lr $lr --out "$OUT/ml100k-$p-$lr" > /dev/null
    row "$p lr $lr" "$OUT/ml100k-$p-$lr"
  done
done
