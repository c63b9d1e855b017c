#!/usr/bin/env bash
# Conformance of `rudder serve` with real clients: the official `openai` Python package (in a
# venv under $RUDDER_HOME) and curl, against the fetched SmolLM2 GGUF and all-MiniLM-L6-v2.
# Then SIGTERM: the server must stop cleanly (exit 0). Usage: scripts/serve_conformance.sh [RUDDER_BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/debug/rudder}"
# the one asset cache: $RUDDER_HOME, else the cache folder the binary uses (XDG on Linux)
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
VENV="$RUDDER_HOME/py-openai"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, pydantic" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "openai>=1.40" pydantic
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT/v1"
LOG=$(mktemp)
"$BIN" serve --model smollm2-135m-instruct --embedding-model all-minilm-l6-v2 \
  --port "$PORT" --api-key conformance-key --max-batch 8 >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; echo "server died"; exit 1; }
  sleep 0.2
done
"$VENV/bin/python" scripts/serve_conformance.py "$BASE" smollm2-135m-instruct all-minilm-l6-v2

fail() { echo "FAIL curl: $*"; exit 1; }
H=(-H "Authorization: Bearer conformance-key" -H "Content-Type: application/json")
out=$(curl -sf "${H[@]}" "$BASE/chat/completions" \
  -d '{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":8,"temperature":0}')
echo "$out" | grep -q '"object":"chat.completion"' || fail "chat: $out"
out=$(curl -sfN "${H[@]}" "$BASE/chat/completions" \
  -d '{"messages":[{"role":"user","content":"Say hi"}],"max_tokens":8,"temperature":0,"stream":true}')
echo "$out" | grep -q '^data: \[DONE\]' || fail "stream: $out"
code=$(curl -s -o /dev/null -w '%{http_code}' "${H[@]}" "$BASE/chat/completions" -d '{"messages": [')
[ "$code" = 400 ] || fail "malformed JSON gave $code"
code=$(curl -s -o /dev/null -w '%{http_code}' "$BASE/models")
[ "$code" = 401 ] || fail "no key gave $code"
out=$(curl -sf "http://127.0.0.1:$PORT/metrics")
echo "$out" | grep -q 'rudder_requests_total' || fail "metrics"
echo "ok   curl: chat, stream, 400, 401, metrics"

kill -TERM $PID
for _ in $(seq 1 100); do kill -0 $PID 2>/dev/null || break; sleep 0.1; done
if kill -0 $PID 2>/dev/null; then echo "FAIL: still running 10 s after SIGTERM"; exit 1; fi
wait $PID && echo "ok   SIGTERM: clean exit" || { echo "FAIL: exit code $? after SIGTERM"; cat "$LOG"; exit 1; }
trap - EXIT
rm -f "$LOG"
