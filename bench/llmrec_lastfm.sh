#!/usr/bin/env bash
# LastFM pipeline of docs/llmrec.md: SFT → DPO / S-DPO from the SFT adapter, evaluation of the
# zero-shot model and of each adapter (likelihood ranking and greedy generation) on the same
# fixed test subset, and the three sequential baselines. Scale through the environment:
#   SFT_TRAIN=256 PREF_TRAIN=128 MAX_TEST=200 MAX_VAL=64 SEQ_EPOCHS=30 SEQ_SELECT=full bench/llmrec_lastfm.sh OUT
# Another LLaRA folder: SEQS=DIR PROMPTS= TEMPLATES=movie (e.g. MovieLens-100K built by
# `rudder llmrec sequences --llara ../shared/data/llara/movielens --out DIR`).
# Results: OUT/*/results.json and summary.md; bench/llmrec_report.py OUT prints the table.
set -euo pipefail
OUT=${1:-bench/out/llmrec}
RUDDER=${RUDDER_BIN:-target/release/rudder}
DATA=${RUDDER_SHARED_DATA:-../shared/data}
SEQS=${SEQS:-$DATA/llara/lastfm}
PROMPTS=${PROMPTS-$DATA/llara/sdpo-lastfm}
TEMPLATES=${TEMPLATES:-music}
SFT_TRAIN=${SFT_TRAIN:-256}
PREF_TRAIN=${PREF_TRAIN:-128}
MAX_TEST=${MAX_TEST:-200}
MAX_VAL=${MAX_VAL:-64}
SEQ_EPOCHS=${SEQ_EPOCHS:-30}
SEQ_SELECT=${SEQ_SELECT:-full}   # or candidates: the kept epoch by the validation questions' candidates
BATCH=${BATCH:-16}
D="--seqs $SEQS${PROMPTS:+ --prompts $PROMPTS}"
L="--templates $TEMPLATES"
mkdir -p "$OUT"
step() { echo "== $(date +%H:%M:%S) $*" >&2; }

[ -f "$OUT/sft/results.json" ] || { step sft; rm -rf "$OUT/sft"
  $RUDDER llmrec sft $D $L --max-train "$SFT_TRAIN" --batch "$BATCH" --epochs 1 --lr 3e-4 \
    --eval-every 0.25 --max-val "$MAX_VAL" --out "$OUT/sft" > "$OUT/sft.log" 2>&1; }
for m in dpo sdpo; do
  [ -f "$OUT/$m/results.json" ] || { step $m; rm -rf "$OUT/$m"
    $RUDDER llmrec $m $D $L --adapter "$OUT/sft/adapter" --max-train "$PREF_TRAIN" --batch "$BATCH" \
      --epochs 1 --lr 1e-4 --eval-every 0.5 --max-val "$MAX_VAL" --out "$OUT/$m" > "$OUT/$m.log" 2>&1; }
done
ev() { # name [adapter]
  [ -f "$OUT/eval-$1/results.json" ] && return 0
  step "eval $1"
  $RUDDER llmrec eval $D $L --max-test "$MAX_TEST" ${2:+--adapter "$2"} --out "$OUT/eval-$1" > "$OUT/eval-$1.log" 2>&1
}
ev zero-shot
ev sft "$OUT/sft/adapter"
for m in dpo sdpo; do
  # a preference stage whose validation never beat its start keeps the SFT adapter byte for
  # byte: its evaluation would repeat SFT's, so SFT's is copied (and says so)
  if [ ! -f "$OUT/eval-$m/results.json" ] && cmp -s "$OUT/$m/adapter/adapter_model.safetensors" "$OUT/sft/adapter/adapter_model.safetensors"; then
    step "eval $m = eval sft (same adapter)"; rm -rf "$OUT/eval-$m"; cp -r "$OUT/eval-sft" "$OUT/eval-$m"
    echo "adapter identical to the SFT adapter; results copied from eval-sft" > "$OUT/eval-$m/SAME_AS_SFT"
  fi
  ev $m "$OUT/$m/adapter"
done
for m in sasrec gru4rec caser; do
  [ -f "$OUT/$m/results.json" ] || { step $m; rm -rf "$OUT/$m"
    $RUDDER llmrec $m $D --max-test "$MAX_TEST" --epochs "$SEQ_EPOCHS" --patience 5 --select-by "$SEQ_SELECT" --out "$OUT/$m" > "$OUT/$m.log" 2>&1; }
done
step done
