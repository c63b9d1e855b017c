#!/usr/bin/env bash
# AdvDrop time per epoch, rudder vs the public reference (Arthurma71/AdvDrop, prepared by
# bench/advdrop_ref_setup.sh), on one of the reference's own datasets, 2 threads each, run one
# after the other. Both run one epoch with the adversarial phase in it (`interval 1`,
# `adv_epochs 1`): one ARM pass over the batches for the mask network, then one training pass.
#
# usage: bench/advdrop_ref_time.sh DATASET 'REFERENCE FLAGS' 'RUDDER FLAGS' [MAX_REF_SECONDS]
#   DATASET  a folder under REF/data (yelp2018.new, yahoo.new)
#   MAX_REF_SECONDS  stop the reference after this long and report its per-step rate from its
#            progress bar (for datasets where one reference pass takes an hour); default: no limit
# REF defaults to /tmp/advdrop-ref. Prints one table row per tool: s/step and s/pass for each phase.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="$1"; REF_FLAGS="$2"; RUDDER_FLAGS="$3"; MAX="${4:-0}"
REF="${REF:-/tmp/advdrop-ref}"
ROOT="$(pwd)"
PY="$ROOT/bench/.venv-lm/bin/python"
OUT="$ROOT/bench/out/advdrop-time-$DATA"
mkdir -p "$OUT"
cargo build --release -q -p rudder

# rudder: same data folder, same schedule (ONLY=reference or ONLY=rudder runs one side)
if [ "${ONLY:-}" != reference ]; then
rm -rf "$OUT/rudder"
target/release/rudder --threads 2 cf train --data "$REF/data/$DATA" --model advdrop --epochs 1 \
  --adv-interval 1 --adv-epochs 1 --eval-every 1 $RUDDER_FLAGS --out "$OUT/rudder" > "$OUT/rudder.log" 2>&1
"$PY" - "$OUT/rudder/metrics.jsonl" <<'EOF'
import json, sys
rec = [json.loads(l) for l in open(sys.argv[1]) if '"epoch"' in l][0]
print(f"rudder: ARM pass {rec['adv_seconds']:.1f} s + training pass {rec['seconds'] - rec['adv_seconds']:.1f} s")
EOF
fi
[ "${ONLY:-}" = rudder ] && exit 0

# reference: one run with both phases, or (MAX_REF_SECONDS > 0) one capped run per phase
cd "$REF"
export PYTHONPATH=.pyg:.shim OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
ref() { # TAG INTERVAL [timeout]
  rm -rf weights runs
  local lim=(); [ "$MAX" -gt 0 ] && lim=(timeout "$MAX")
  "${lim[@]}" "$PY" run_AdvDrop.py --modeltype AdvDrop --dataset "$DATA" --data_path ./data/ \
    --n_layers 2 --neg_sample 1 --saveID time --interval "$2" --adv_epochs 1 --epoch 1 \
    --num_workers 0 $REF_FLAGS > "$OUT/reference-$1.log" 2>&1 || true
  cat weights/*/AdvDrop/*stats_time.txt > "$OUT/reference-$1.stats" 2>/dev/null || : > "$OUT/reference-$1.stats"
}
if [ "$MAX" -gt 0 ]; then ref arm 1; ref train 1000000; else ref both 1; fi
"$PY" - "$OUT" <<'EOF'
import os, re, sys
out = sys.argv[1]
def bar_rate(log):
    """s/step and steps per pass from the last tqdm update 'n/total [mm:ss<'."""
    bars = re.findall(r"(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", log)
    if not bars:
        return None
    n, total, h, m, s = bars[-1]
    t = int(h or 0) * 3600 + int(m) * 60 + int(s)
    return t / int(n), int(total), int(n), t
for tag in ("both", "arm", "train"):
    if not os.path.exists(f"{out}/reference-{tag}.log"):
        continue
    log = open(f"{out}/reference-{tag}.log", errors="replace").read()
    stats = open(f"{out}/reference-{tag}.stats").read()
    adv = re.findall(r"Adv Epoch 0 \[([\d.]+)s\]", stats)
    main = re.findall(r"^Epoch 0 \[([\d.]+)s\]", stats, re.M)
    if tag == "both" and adv and main:
        print(f"reference: ARM pass {float(adv[0]):.1f} s + training pass {float(main[0]):.1f} s (its own timers)")
        continue
    phase = "ARM pass" if tag == "arm" else "training pass"
    done = adv if tag == "arm" else main
    if done:
        print(f"reference: {phase} {float(done[0]):.1f} s (its own timer)")
    elif (r := bar_rate(log)) is not None:
        rate, total, n, t = r
        print(f"reference: {phase} stopped at step {n}/{total} after {t} s: {rate:.2f} s/step, "
              f"{rate * total:.0f} s per pass at that rate")
    else:
        print(f"reference: no timing for the {phase}; see {out}/reference-{tag}.log")
EOF
