#!/usr/bin/env bash
# AdvInfoNCE beside its reference code (LehengTHU/AdvInfoNCE, prepared by
# bench/advinfonce_ref_setup.sh) on the reference's own Coat / Yahoo data and README
# hyper-parameters, several seeds each: the reference, rudder --faithful true (its two bugs kept)
# and rudder's default (bugs fixed). Same machine, one after the other, 2 threads each.
#
# usage: [EPOCHS=N] bench/advinfonce_ref.sh DATASET BACKBONE "SEEDS" [REF]
#   DATASET coat | yahoo   BACKBONE lightgcn | mf   e.g. bench/advinfonce_ref.sh coat lightgcn "101 102 103"
#   EPOCHS caps both tools at N epochs (time per epoch and early curves on a large dataset,
#   where a run to early stopping takes hours); the output folder gets an -eN suffix.
# Writes bench/out/advinfonce_ref/<dataset>-<backbone>/{ref-<seed>.log, rudder-<mode>-<seed>/}
# and prints the table bench/advinfonce_ref_report.py makes of them.
set -euo pipefail
DS="${1:?dataset}"; BB="${2:?backbone}"; SEEDS="${3:-101 102 103}"; REF="${4:-/tmp/advinfonce-ref}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/bench/.venv-lm/bin/python"
BIN="${RUDDER_BIN:-$ROOT/target/release/rudder}"
CAP_REF=""; CAP_RUD=""; SUFFIX=""
if [ -n "${EPOCHS:-}" ]; then CAP_REF="--epoch $EPOCHS"; CAP_RUD="--epochs $EPOCHS"; SUFFIX="-e$EPOCHS"; fi
OUT="$ROOT/bench/out/advinfonce_ref/$DS-$BB$SUFFIX"
mkdir -p "$OUT"
case "$DS" in
  coat)  DIR=coat;      ARGS="--neg_sample 64 --tau 0.75 --lr 1e-3 --batch_size 1024 --adv_lr 1e-2 --adv_interval 15"
         ETA=$([ "$BB" = lightgcn ] && echo 20 || echo 18) ;;
  yahoo) DIR=yahoo.new; ARGS="--neg_sample 64 --tau 0.28 --lr 5e-4 --batch_size 1024 --adv_lr 1e-4"
         ETA=$([ "$BB" = lightgcn ] && echo 13 || echo 12) ;;
  *) echo "dataset: coat or yahoo" >&2; exit 1 ;;
esac
LAYERS=$([ "$BB" = lightgcn ] && echo 2 || echo 0)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
for s in $SEEDS; do
  if [ ! -s "$OUT/ref-$s.log" ]; then
    (cd "$REF" && rm -rf "weights/$DIR" && PYTHONPATH=.shim "$PY" train_AdvInfoNCE.py --train_norm --pred_norm \
       --modeltype AdvInfoNCE --model_version embed --dataset "$DIR" --n_layers "$LAYERS" $ARGS \
       --eta_epochs "$ETA" --seed "$s" --dsc "bench$s" $CAP_REF > /dev/null 2>&1 || true
     cat weights/"$DIR"/AdvInfoNCE*/bench"$s"*stats_*.txt) > "$OUT/ref-$s.log"
  fi
  for mode in faithful default; do
    run="$OUT/rudder-$mode-$s"
    [ -s "$run/summary.md" ] && continue
    rm -rf "$run"
    f=$([ "$mode" = faithful ] && echo true || echo false)
    "$BIN" --threads 2 cf train --data "$REF/data/$DIR" --preset "advinfonce-$DS-$BB" --seed "$s" \
      --faithful "$f" $CAP_RUD --out "$run" > /dev/null 2>&1
  done
done
"$PY" "$ROOT/bench/advinfonce_ref_report.py" "$OUT"
