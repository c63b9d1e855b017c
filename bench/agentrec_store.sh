#!/usr/bin/env bash
# The AgentRecBench record store on a generated multi-GB release, side by side with the
# reference's LMDB-backed CacheInteractionTool (tsinghua-fib-lab/AgentSocietyChallenge, run from
# a checkout, not copied): build time, peak memory, reopen time, size on disk.
#
# usage: bench/agentrec_store.sh CORPUS_DIR REFERENCE_CHECKOUT [SIZE_GB=2]
#   CORPUS_DIR is written by bench/agentrec_corpus.py when missing; the peer needs a Python
#   with `lmdb` and `tqdm` (PYTHON, default python3).
set -euo pipefail
C=${1:?corpus dir}; REF=${2:?AgentSocietyChallenge checkout}; GB=${3:-2}
R=${RUDDER:-target/release/rudder}; PY=${PYTHON:-python3}
[ -f "$C/review.json" ] || python3 "$(dirname "$0")/agentrec_corpus.py" "$C" "$GB"
du -sh "$C"/*.json
rm -f "$C/agentrec.redb"; rm -rf "$C/lmdb_cache"
echo "== rudder: build"; /usr/bin/time -f "%e s wall, %M KB peak" $R bench agentrec store --data "$C"
echo "== rudder: reopen"; /usr/bin/time -f "%e s wall, %M KB peak" $R bench agentrec store --data "$C"
du -sh "$C/agentrec.redb"
cat > /tmp/peer_store.py <<'PY'
import sys, time
sys.path.insert(0, sys.argv[1] + "/websocietysimulator/tools")
import logging; logging.disable(logging.INFO)
from cache_interaction_tool import CacheInteractionTool
t = time.time()
tool = CacheInteractionTool(sys.argv[2])
print(f"CacheInteractionTool ready in {time.time() - t:.1f} s")
PY
echo "== reference CacheInteractionTool: build"; /usr/bin/time -f "%e s wall, %M KB peak" $PY /tmp/peer_store.py "$REF" "$C" 2>&1 | grep -v "it/s\|^\s*$" | tail -3
echo "== reference CacheInteractionTool: reopen"; /usr/bin/time -f "%e s wall, %M KB peak" $PY /tmp/peer_store.py "$REF" "$C" 2>&1 | tail -2
du -sh "$C/lmdb_cache"
