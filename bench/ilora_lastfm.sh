#!/usr/bin/env bash
# LastFM comparison of docs/llmrec.md (issue 14) on LLaRA's protocol: questions built from the
# LLaRA sequence files (histories of at most 10 items, the SASRec window; 19 sampled negatives
# + the target), SASRec vs text-only SFT vs LLaRA (hybrid prompts, one LoRA) vs iLoRA (K
# experts), all LoRA runs at the same scale (training examples, batch, epoch, learning rate,
# validation) and evaluated on the same test questions; then the expert-count ablation at a
# smaller scale (likelihood ranking only). Peak memory of each training run via /usr/bin/time -v.
#   TRAIN=128 ABL_TRAIN=64 MAX_VAL=32 bench/ilora_lastfm.sh OUT
set -euo pipefail
OUT=${1:-bench/out/ilora}
RUDDER=${RUDDER_BIN:-target/release/rudder}
DATA=${RUDDER_SHARED_DATA:-../shared/data}
D="--seqs $DATA/llara/lastfm"
TRAIN=${TRAIN:-128}
MAX_VAL=${MAX_VAL:-32}
BATCH=${BATCH:-16}
LR=${LR:-3e-4}
ABL_TRAIN=${ABL_TRAIN:-64}
SEQ_EPOCHS=${SEQ_EPOCHS:-10}
mkdir -p "$OUT"
step() { echo "== $(date +%H:%M:%S) $*" >&2; }
[ -f "$OUT/sasrec/results.json" ] || { step sasrec; rm -rf "${OUT:?}/sasrec"
  $RUDDER llmrec sasrec $D --epochs "$SEQ_EPOCHS" --patience 5 --out "$OUT/sasrec" > "$OUT/sasrec.log" 2>&1; }
SAS=$OUT/sasrec
train() { # name method extra...
  local name=$1 method=$2; shift 2
  [ -f "$OUT/$name/results.json" ] && return 0
  step "$name"; rm -rf "${OUT:?}/$name"
  local extra=()
  [ "$method" = sft ] || extra=(--sasrec "$SAS")
  /usr/bin/time -v $RUDDER llmrec "$method" $D "${extra[@]}" --batch "$BATCH" --epochs 1 \
    --lr "$LR" --max-val "$MAX_VAL" --eval-every 0.5 "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}
ev() { # name adapter [mode]
  [ -f "$OUT/eval-$1/results.json" ] && return 0
  step "eval $1"
  $RUDDER llmrec eval $D --adapter "$2" --mode "${3:-both}" --out "$OUT/eval-$1" > "$OUT/eval-$1.log" 2>&1
}
train sft sft --max-train "$TRAIN"
ev sft "$OUT/sft/adapter"
train llara llara --max-train "$TRAIN"
ev llara "$OUT/llara/adapter"
train ilora4 ilora --experts 4 --max-train "$TRAIN"
ev ilora4 "$OUT/ilora4/adapter"
# expert-count ablation (K = 1 is LLaRA's single LoRA)
train abl-k1 llara --max-train "$ABL_TRAIN"
ev abl-k1 "$OUT/abl-k1/adapter" likelihood
for k in 2 4 8; do
  train "abl-k$k" ilora --experts "$k" --max-train "$ABL_TRAIN"
  ev "abl-k$k" "$OUT/abl-k$k/adapter" likelihood
done
step done
