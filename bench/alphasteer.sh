#!/usr/bin/env bash
# AlphaSteer on the fetched SmolLM2-135M-Instruct with the shared refusal sets, and its peer
# checks (needs bench/lm_setup.sh's venv, bench/.venv-lm, for NumPy/PyTorch):
#  1. fit: benign_train (first NB) vs harmful_train_1000 (first NH), layers 7–18 (25–60 % of
#     depth), p = 0.6, α = 10;
#  2. the fit against NumPy's literal reference algorithm (pinv of XᵀX + αPᵀP) on the same
#     captured matrices, and fit time per layer (rudder, NumPy, PyTorch);
#  3. the same at d = 4096 on synthetic activations (14,000 benign × 2,000 malicious rows);
#  4. the safety/utility evaluation at a stated scale (EVAL_LIMIT prompts per set, generation
#     capped at EVAL_TOKENS tokens).
# usage: bench/alphasteer.sh [NB=1000] [NH=500] [EVAL_LIMIT=20] [EVAL_TOKENS=64] [STRENGTHS=0,0.5,1,2] [VECTOR=1]
set -euo pipefail
cd "$(dirname "$0")/.."
NB="${1:-1000}"; NH="${2:-500}"; LIM="${3:-20}"; TOK="${4:-64}"; ST="${5:-0,0.5,1,2}"; VS="${6:-1}"
export RUDDER_HOME="${RUDDER_HOME:-$PWD/.rudder}"
PY=bench/.venv-lm/bin/python
BIN=target/release/rudder
R=../shared/data/steering/refusal
OUT=bench/out/alphasteer; mkdir -p "$OUT"
# the refusal sets (the math and AlpacaEval sets need far longer generations than this scale allows)
SETS="${SETS:-advbench,jbb,aim,autodan,cipher,gcg,jailbroken,pair,renellm,xstest_safe}"
echo "== fit (SmolLM2, $NB benign, $NH harmful)"
/usr/bin/time -f "%e s wall, %M KB peak" $BIN --threads 2 steer alphasteer fit -m smollm2-135m-instruct \
  --benign $R/benign_train.json --limit-benign "$NB" --harmful $R/harmful_train_1000.json --limit-harmful "$NH" \
  --out "$OUT/smol.safetensors"
echo "== fit vs NumPy / PyTorch (d = 576)"
OMP_NUM_THREADS=2 $PY bench/alphasteer_numpy.py check "$OUT/smol.safetensors" \
  "$OUT/smol.safetensors.acts/benign.safetensors" "$OUT/smol.safetensors.acts/harmful.safetensors" | head -1
echo "== fit vs NumPy / PyTorch (d = 4096, synthetic)"
[ -f "$OUT/synth4096/benign.safetensors" ] || $PY bench/alphasteer_numpy.py synth "$OUT/synth4096" 4096 14000 2000
$BIN --threads 2 steer alphasteer fit --benign-acts "$OUT/synth4096/benign.safetensors" \
  --harmful-acts "$OUT/synth4096/harmful.safetensors" --out "$OUT/synth4096/steer.safetensors"
OMP_NUM_THREADS=2 $PY bench/alphasteer_numpy.py check "$OUT/synth4096/steer.safetensors" \
  "$OUT/synth4096/benign.safetensors" "$OUT/synth4096/harmful.safetensors" | head -1
[ "${EVAL:-1}" = 1 ] || exit 0
echo "== evaluation ($LIM prompts per set, ≤ $TOK tokens)"
$BIN --threads 2 steer eval-refusal -m smollm2-135m-instruct --steer "$OUT/smol.safetensors" --data $R \
  --strengths "$ST" --vector-strengths "$VS" --only "$SETS" --limit "$LIM" --max-tokens "$TOK" --batch 32 \
  --out "$OUT/eval" > /dev/null
cat "$OUT/eval/summary.md"
