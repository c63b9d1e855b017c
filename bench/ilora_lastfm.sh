#!/usr/bin/env bash
# LastFM comparison of docs/llmrec.md (issue 14): LLaRA (hybrid prompts, one LoRA) and iLoRA
# (K experts) against the text-only SFT of bench/llmrec_lastfm.sh, at the same scale (training
# examples, batch, epochs, learning rate, validation), evaluated on the same fixed test subset;
# then the expert-count ablation at a smaller scale. Needs the SASRec run of
# bench/llmrec_lastfm.sh (OUT/sasrec). Peak memory of each training run via /usr/bin/time -v.
#   TRAIN=256 MAX_TEST=100 MAX_VAL=64 ABL_TRAIN=64 bench/ilora_lastfm.sh OUT
set -euo pipefail
OUT=${1:-bench/out/llmrec}
RUDDER=${RUDDER_BIN:-target/release/rudder}
DATA=${RUDDER_SHARED_DATA:-../shared/data}
D="--seqs $DATA/llara/lastfm --prompts $DATA/llara/sdpo-lastfm"
TRAIN=${TRAIN:-256}
MAX_TEST=${MAX_TEST:-100}
MAX_VAL=${MAX_VAL:-64}
BATCH=${BATCH:-16}
LR=${LR:-3e-4}
ABL_TRAIN=${ABL_TRAIN:-64}
SAS=$OUT/sasrec
[ -f "$SAS/model.safetensors" ] || { echo "no $SAS: run bench/llmrec_lastfm.sh first" >&2; exit 1; }
step() { echo "== $(date +%H:%M:%S) $*" >&2; }
train() { # name method extra...
  local name=$1 method=$2; shift 2
  [ -f "$OUT/$name/results.json" ] && return 0
  step "$name"; rm -rf "${OUT:?}/$name"
  /usr/bin/time -v $RUDDER llmrec "$method" $D --sasrec "$SAS" --batch "$BATCH" --epochs 1 \
    --lr "$LR" --max-val "$MAX_VAL" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
ev() { # name adapter
  [ -f "$OUT/eval-$1/results.json" ] && return 0
  step "eval $1"
  $RUDDER llmrec eval $D --max-test "$MAX_TEST" --adapter "$2" --out "$OUT/eval-$1" > "$OUT/eval-$1.log" 2>&1
}
train llara llara --max-train "$TRAIN" --eval-every 0.25
ev llara "$OUT/llara/adapter"
train ilora4 ilora --experts 4 --max-train "$TRAIN" --eval-every 0.25
ev ilora4 "$OUT/ilora4/adapter"
# expert-count ablation (K = 1 is LLaRA's single LoRA)
train abl-k1 llara --max-train "$ABL_TRAIN" --eval-every 0.5
ev abl-k1 "$OUT/abl-k1/adapter"
for k in 2 4 8; do
  train "abl-k$k" ilora --experts "$k" --max-train "$ABL_TRAIN" --eval-every 0.5
  ev "abl-k$k" "$OUT/abl-k$k/adapter"
done
step done
