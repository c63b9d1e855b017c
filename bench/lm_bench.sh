#!/usr/bin/env bash
# rudder-lm next to its peers: parity (HF transformers f32, llama.cpp Q4_1) and speed (decode,
# prefill, hidden-state capture, MiniLM embedding). Needs bench/lm_setup.sh and the fetched
# assets (scripts/test.sh fetches them into $RUDDER_HOME, default ~/.cache/rudder).
set -euo pipefail
cd "$(dirname "$0")/.."
# the one asset cache: $RUDDER_HOME, else the cache folder the binary uses (XDG on Linux)
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
cargo build --release -p rudder
A="$RUDDER_HOME/assets"
PY=bench/.venv-lm/bin/python
mkdir -p bench/out
$PY bench/lm_parity.py "$A/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" target/release/rudder bench/out/lm_parity.json
$PY bench/lm_speed.py target/release/rudder "$A/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
    "$A/all-minilm-l6-v2" "$A/ml-100k/ml-100k.item" bench/out/lm_speed.json "$@"
