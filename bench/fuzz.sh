#!/usr/bin/env bash
# Coverage-guided fuzzing of every rudder parser (cargo-fuzz + libFuzzer, nightly toolchain;
# the project itself builds on stable). Seeds come from the tests' tiny models and the heads of
# real files (../shared/data, the fetched assets); nothing of them is committed.
#
# usage: bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   needs: rustup toolchain nightly, cargo install cargo-fuzz
# Writes bench/out/fuzz/<target>.log and bench/out/fuzz/summary.md (iterations, coverage,
# crashes). A crash input lands in fuzz/artifacts/<target>/: copy it to
# crates/rudder-fuzz/tests/crashes/<target>/ (the tests replay it), fix, rerun.
set -uo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-120}"; shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(gguf safetensors captures steer_files control_vector tokenizer chat_template model_config datasets run_config interventions)
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
SHARED="${RUDDER_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
OUT=bench/out/fuzz
mkdir -p "$OUT" fuzz/corpus
cargo run -q -p rudder-fuzz --example fuzz_seeds -- fuzz/corpus "$SHARED" "$RUDDER_HOME/assets"
(cd fuzz && cargo +nightly fuzz build -s none --release) || exit 1
echo "| target | seconds | executions | exec/s | coverage (edges) | corpus | crashes |" > "$OUT/summary.md"
echo "|---|---|---|---|---|---|---|" >> "$OUT/summary.md"
for t in "${TARGETS[@]}"; do
  echo "== $t ($SECS s)"
  (cd fuzz && cargo +nightly fuzz run -s none --release "$t" "corpus/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
      -max_len=65536 -print_final_stats=1) > "$OUT/$t.log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$OUT/$t.log" | grep -o '[0-9]*$' | tail -1)
  eps=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$OUT/$t.log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$OUT/$t.log" | tail -1 | grep -o '[0-9]*')
  corp=$(ls "fuzz/corpus/$t" | wc -l)
  crashes=$(ls "fuzz/artifacts/$t" 2>/dev/null | wc -l)
  echo "| $t | $SECS | ${execs:-?} | ${eps:-?} | ${cov:-?} | $corp | $crashes (exit $rc) |" >> "$OUT/summary.md"
done
cat "$OUT/summary.md"
