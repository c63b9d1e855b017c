#!/usr/bin/env bash
# AlphaRec vs LightGCN (ID) vs MF at equal budget (same loss, sampler, batch, epochs,
# evaluation), plus AlphaRec zero-shot across datasets. Item features: all-MiniLM-L6-v2 of the
# titles, computed in process. Results: bench/out/alpharec/*/summary.md and zero_shot_*.md.
# usage: bench/alpharec.sh [EPOCHS]   (RUDDER_HOME must hold ml-1m, ml-100k, all-minilm-l6-v2)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-40}"
R="target/release/rudder --threads 2"
SHARED="${RUDDER_SHARED_DATA:-../shared/data}"
cargo build --release -p rudder
OUT=bench/out/alpharec
mkdir -p $OUT
COMMON="--loss infonce --tau 0.15 --n-neg 64 --lr 1e-3 --batch-size 2048 --epochs $EPOCHS --eval-every 5 --patience 4 --ks 20"
for data in a4r:$SHARED/agent4rec-ml1m ml1m:ml-1m; do
  tag=${data%%:*}; d=${data#*:}
  extra=""; [ "$tag" = ml1m ] && extra="--min-rating 4"
  for model in alpharec lightgcn mf; do
    reg="--reg 0"; [ "$model" != alpharec ] && reg="--reg 1e-5"
    layers=""; [ "$model" = lightgcn ] && layers="--layers 2"
    $R cf train --data $d $extra --model $model $COMMON $reg $layers --out $OUT/$tag-$model | tail -8
  done
done
# zero-shot: projector trained on one dataset, evaluated on another from titles alone
$R cf eval --run $OUT/a4r-alpharec --data ml-100k
$R cf eval --run $OUT/ml1m-alpharec --data $SHARED/agent4rec-ml1m
$R cf eval --run $OUT/ml1m-alpharec --data ml-100k
