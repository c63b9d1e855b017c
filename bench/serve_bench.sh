#!/usr/bin/env bash
# rudder serve vs llama-cpp-python's OpenAI server (llama.cpp underneath) on the same GGUF
# (SmolLM2-135M-Instruct Q4_1) and the same 2 threads: aggregate completion tokens/s, request
# latency p50/p99 and time to first token at 1, 8 and 32 closed-loop clients; then a burst of
# 1,000 simultaneous streaming requests against rudder serve (designed 429s counted apart,
# peak RSS). Needs bench/serve_setup.sh first and target/release/rudder.
#   bench/serve_bench.sh [REQUESTS_PER_LEVEL=64] [MAX_TOKENS=64] [BURST=1000]
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${1:-64}"; MAXTOK="${2:-64}"; BURST="${3:-1000}"
# the one asset cache: $RUDDER_HOME, else the cache folder the binary uses (XDG on Linux)
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
BIN=target/release/rudder
PY=bench/.venv-serve/bin/python
GGUF="$RUDDER_HOME/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT=bench/out/serve; mkdir -p "$OUT"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "server did not come up"; exit 1; }
lscpu | grep 'Model name' | sed 's/ \+/ /g'

P=$(port)
$BIN --threads 2 serve --model "$GGUF" --served-name smollm2 --port "$P" --max-batch 32 --max-queue 256 2>"$OUT/rudder.log" &
RP=$!
wait_up "http://127.0.0.1:$P/health"
echo "== rudder serve"
$PY bench/serve_load.py throughput "http://127.0.0.1:$P/v1" smollm2 --levels 1 8 32 \
  --requests "$REQ" --max-tokens "$MAXTOK" --out "$OUT/rudder_throughput.json"
echo "== rudder serve, streaming (time to first token)"
$PY bench/serve_load.py throughput "http://127.0.0.1:$P/v1" smollm2 --levels 1 8 32 \
  --requests "$REQ" --max-tokens "$MAXTOK" --stream --out "$OUT/rudder_stream.json"
kill -TERM $RP; wait $RP || true

P=$(port)
$PY -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --n_threads 2 --n_threads_batch 2 \
  --n_ctx 2048 --port "$P" >"$OUT/llamacpp.log" 2>&1 &
LP=$!
wait_up "http://127.0.0.1:$P/v1/models"
echo "== llama-cpp-python server"
$PY bench/serve_load.py throughput "http://127.0.0.1:$P/v1" smollm2 --levels 1 8 32 \
  --requests "$REQ" --max-tokens "$MAXTOK" --out "$OUT/llamacpp_throughput.json"
echo "== llama-cpp-python server, streaming"
$PY bench/serve_load.py throughput "http://127.0.0.1:$P/v1" smollm2 --levels 1 8 32 \
  --requests "$REQ" --max-tokens "$MAXTOK" --stream --out "$OUT/llamacpp_stream.json"
kill -TERM $LP; wait $LP || true

P=$(port)
$BIN --threads 2 serve --model "$GGUF" --served-name smollm2 --port "$P" --max-batch 32 --max-queue 256 2>"$OUT/rudder_burst.log" &
RP=$!
wait_up "http://127.0.0.1:$P/health"
echo "== burst of $BURST streaming requests against rudder serve"
$PY bench/serve_load.py burst "http://127.0.0.1:$P/v1" smollm2 --n "$BURST" --max-tokens 32 \
  --pid $RP --out "$OUT/rudder_burst.json"
curl -s "http://127.0.0.1:$P/metrics" | grep -E '^rudder_(requests_total|generations|completion_tokens_total)' || true
kill -TERM $RP; wait $RP || true
