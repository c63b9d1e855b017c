#!/usr/bin/env bash
# Probe speed at the issue's scale: every HF hidden state of SmolLM2 (31 sites, d = 576) on the
# 1,738 MATH questions, Lasso(α=10) and ridge, rudder vs scikit-learn on the same matrices and
# split. The target is a stand-in with the scale of token counts (the question's length in
# characters), since labels for all 1,738 questions would take hours of generation here.
# usage: bench/steer_probe_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the one asset cache: $RUDDER_HOME, else the cache folder the binary uses (XDG on Linux)
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
PY=bench/.venv-serve/bin/python
BIN=target/release/rudder
Q=../shared/data/steering/reasoning/math.json
OUT=bench/out/steer_speed; mkdir -p "$OUT"
[ -f "$OUT/acts.safetensors" ] || /usr/bin/time -v $BIN --threads 2 steer capture -m smollm2-135m-instruct \
  --prompts $Q --label level --sites hf --out "$OUT/acts.safetensors" 2> "$OUT/capture.time"
grep -E "Elapsed|Maximum resident" "$OUT/capture.time" || true
$PY -c "import json; q=json.load(open('$Q')); json.dump([{'mean_reasoning_tokens': float(len(x['problem']))} for x in q], open('$OUT/targets.json','w'))"
for p in lasso ridge; do
  /usr/bin/time -f "%e s wall" $BIN --threads 2 steer probe --acts "$OUT/acts.safetensors" --targets "$OUT/targets.json" \
    --probe $p --alpha 10 --out "$OUT/$p" > /dev/null
  echo "== $p: rudder vs scikit-learn (same split)"
  OMP_NUM_THREADS=2 $PY bench/steer_peers.py probes "$OUT/acts.safetensors" "$OUT/$p" "$OUT/targets.json" 10
done
