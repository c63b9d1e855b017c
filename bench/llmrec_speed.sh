#!/usr/bin/env bash
# LoRA training throughput, rudder vs transformers+peft on CPU (same model in f32, same LoRA,
# same batch and lengths), and the S-DPO step with and without cached reference log-probs and
# prefix sharing. Needs bench/.venv-lm (bench/lm_setup.sh) with peft.
#   bench/llmrec_speed.sh [OUT]   (THREADS, BATCH, PROMPT, STEPS from the environment)
set -euo pipefail
OUT=${1:-bench/out/llmrec-speed}
THREADS=${THREADS:-2}; BATCH=${BATCH:-4}; PROMPT=${PROMPT:-180}; STEPS=${STEPS:-4}
RUDDER=${RUDDER_BIN:-target/release/rudder}
PY=${PY:-bench/.venv-lm/bin/python}
DATA=${RUDDER_SHARED_DATA:-../shared/data}
mkdir -p "$OUT"
GGUF=$($RUDDER assets path smollm2-135m-instruct)
[ -d "$OUT/hf" ] || $RUDDER lm export-hf --model "$GGUF" --out "$OUT/hf"
cargo build --release -q -p rudder-llmrec --example step_profile
echo "== SFT step, batch $BATCH × ($PROMPT + 4) tokens, $THREADS threads" >&2
RAYON_NUM_THREADS=$THREADS target/release/examples/step_profile "$GGUF" "$BATCH" "$PROMPT" "$STEPS" | tee "$OUT/rudder.json"
"$PY" bench/llmrec_speed.py "$OUT/hf" "$BATCH" "$PROMPT" "$STEPS" "$THREADS" 2>/dev/null | tee "$OUT/torch.json"
echo "== S-DPO step (16 examples, k = 3) with and without the shortcuts" >&2
L=$DATA/llara
for v in "shared-cached:" "plain-cached:--no-prefix-sharing" "plain-uncached:--no-prefix-sharing --no-reference-cache"; do
  name=${v%%:*}; flags=${v#*:}
  rm -rf "$OUT/sdpo-$name"
  RAYON_NUM_THREADS=$THREADS $RUDDER llmrec sdpo --seqs $L/lastfm --prompts $L/sdpo-lastfm --max-train 16 --batch 16 \
    --epochs 1 --max-val 4 --lr 1e-4 $flags --out "$OUT/sdpo-$name" > "$OUT/sdpo-$name.log" 2>&1
  python3 -c "import json,sys; r=json.load(open('$OUT/sdpo-$name/results.json')); print(json.dumps({'variant':'$name','seconds_per_step':r['seconds_per_step'],'total_seconds':r['seconds']}))"
done | tee "$OUT/sdpo.jsonl"
