#!/usr/bin/env bash
# Peer checks of rudder steer on a `rudder steer plan` run folder (needs bench/serve_setup.sh's
# venv with scikit-learn, scipy, safetensors and gguf: `bench/.venv-serve/bin/pip install
# scikit-learn scipy safetensors gguf`):
#  1. the run's activations and split fitted with scikit-learn — Lasso(α=10) and Ridge(α=10) —
#     against `rudder steer probe` (coefficients, test Spearman, time per layer);
#  2. the run's steering vector exported to llama.cpp's control-vector GGUF, applied in llama.cpp
#     (llama_apply_adapter_cvec) and in rudder (`steer import` → `lm dump --interventions`),
#     teacher-forced on the same f32 GGUF (SmolLM2 dequantized), logits compared;
#  3. `rudder steer capture --sites hf` on that f32 GGUF against Hugging Face transformers'
#     output_hidden_states at the last prompt token, chat template applied by each tool itself
#     (needs bench/lm_setup.sh's venv, bench/.venv-lm, for torch + transformers).
# usage: bench/steer_peers.sh RUN_DIR [TOL=1e-8] [STRENGTH=0.5]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$1"; TOL="${2:-1e-8}"; S="${3:-0.5}"
export RUDDER_HOME="${RUDDER_HOME:-$PWD/.rudder}"
PY=bench/.venv-serve/bin/python
BIN=target/release/rudder
GGUF="$RUDDER_HOME/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=bench/out/steer_peers; mkdir -p "$OUT"
for p in lasso ridge; do
  $BIN --threads 2 steer probe --acts "$RUN/acts.safetensors" --targets "$RUN/labels.json" \
    --probe $p --alpha 10 --tol "$TOL" --max-iter 100000 --out "$OUT/$p" >/dev/null
  echo "== $p vs scikit-learn"
  OMP_NUM_THREADS=2 $PY bench/steer_peers.py probes "$RUN/acts.safetensors" "$OUT/$p" "$RUN/labels.json" 10
done
[ -f "$OUT/smollm2-f32.gguf" ] || $PY bench/steer_peers.py f32 "$GGUF" "$OUT/smollm2-f32.gguf"
$BIN steer export --vector "$RUN/vector.safetensors" --model-hint smollm2 --out "$OUT/vector.gguf"
$BIN steer import --vector "$OUT/vector.gguf" --strength "$S" --out "$OUT/vector.json"
TEXT="Please reason step by step. This is the problem: what is the sum of the first ten odd numbers?"
$BIN lm dump -m "$OUT/smollm2-f32.gguf" --text "$TEXT" --out "$OUT/ids.safetensors"
$PY -c "from safetensors.numpy import load_file; import json; json.dump([int(i) for i in load_file('$OUT/ids.safetensors')['ids']], open('$OUT/ids.json','w'))"
$BIN --threads 2 lm dump -m "$OUT/smollm2-f32.gguf" --ids "$OUT/ids.json" --interventions "$OUT/vector.json" --out "$OUT/rudder_steered.safetensors"
echo "== control vector: llama.cpp vs rudder (strength $S)"
$PY bench/steer_peers.py cvec "$OUT/smollm2-f32.gguf" "$OUT/vector.gguf" "$OUT/rudder_steered.safetensors" "$S" "$OUT/ids.json" | tee "$OUT/cvec.json"
Q=../shared/data/steering/reasoning/math.json
rm -rf "$OUT/hf_acts.safetensors"*
$BIN --threads 2 steer capture -m "$OUT/smollm2-f32.gguf" --prompts $Q --limit 24 --sites hf \
  --template "$(printf 'Please reason step by step, and put your final answer within \\boxed{}.\nThis is the problem:\n{problem}')" \
  --out "$OUT/hf_acts.safetensors" >/dev/null
echo "== capture: rudder vs Hugging Face transformers output_hidden_states (f32)"
OMP_NUM_THREADS=2 bench/.venv-lm/bin/python bench/steer_peers.py capture "$OUT/smollm2-f32.gguf" "$OUT/hf_acts.safetensors" $Q
