#!/usr/bin/env bash
# rudder's batched generation against HF transformers' batched `generate`, the issue-11 target
# (>= 2x at 16+ rows on the same f32 model), in alternating rounds on the machine at hand:
# each round runs HF (bench/hf_generate.py) and `rudder lm bench --batch` on the same f32 GGUF
# (SmolLM2-135M-Instruct dequantized), 256-token prompts, 128 greedy tokens per row, 2 threads,
# f32 KV cache; the order flips every round (on a shared VM the run after a process exits is
# often slower). It prints one table row per round and batch and, per batch, the median and
# smallest ratio and how many rounds reached 2x. Extra arguments go to `rudder lm bench`.
#
# Needs bench/lm_setup.sh's venv (torch + transformers + gguf) and the fetched SmolLM2 asset.
# On an AVX-512 CPU, RUDDER_NO_AVX512=1 makes rudder take its AVX2 kernels (a stand-in for an
# AVX2-only CPU; HF's MKL/oneDNN paths do not change with it, see docs/benchmarks.md).
# usage: bench/batched_vs_hf.sh [ROUNDS=3] [BATCHES=16,32] [-- rudder lm bench args]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"; BATCHES="${2:-16,32}"
shift $(( $# > 2 ? 2 : $# )); [ "${1:-}" = "--" ] && shift
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
PY=bench/.venv-lm/bin/python
BIN="${BIN:-target/release/rudder}"
GGUF="$RUDDER_HOME/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
F32=bench/out/steer_peers/smollm2-f32.gguf
OUT=bench/out/batched_vs_hf.jsonl
LOG=bench/out/batched_vs_hf.log
[ -x "$PY" ] || { echo "no $PY: run bench/lm_setup.sh first" >&2; exit 2; }
[ -n "${BIN_PREBUILT:-}" ] || cargo build --release -p rudder
[ -f "$GGUF" ] || "$BIN" assets fetch smollm2-135m-instruct
mkdir -p "$(dirname "$F32")"
[ -f "$F32" ] || $PY bench/steer_peers.py f32 "$GGUF" "$F32"
: > "$OUT"; : > "$LOG"
hf() {
  OMP_NUM_THREADS=2 $PY bench/hf_generate.py "$F32" "$BATCHES" 128 1 2>>"$LOG" \
    | sed "s/^{/{\"tool\": \"hf\", \"round\": $1, /" >> "$OUT"
}
rd() {
  "$BIN" --threads 2 lm bench -m "$F32" --batch "$BATCHES" --reps 1 --kv f32 "$@" 2>>"$LOG" \
    | $PY -c 'import json, sys
r = int(sys.argv[1])
for b in json.load(sys.stdin)["batched"]:
    print(json.dumps({"tool": "rudder", "round": r, "batch": b["batch"], "wall_s": b["wall_s"],
                      "aggregate_tok_s": b["aggregate_tok_s"]}))' "$R" >> "$OUT"
}
for R in $(seq 1 "$ROUNDS"); do
  if [ $((R % 2)) = 1 ]; then hf "$R"; rd "$@"; else rd "$@"; hf "$R"; fi
  echo "round $R of $ROUNDS done" >&2
done
$PY bench/batched_vs_hf.py "$OUT"
