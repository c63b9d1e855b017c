#!/usr/bin/env bash
# AlphaSteer layer-band × null-space-ratio ablation on the fetched SmolLM2-135M-Instruct (issue
# 12): activations of all 30 layers captured once (the first NB benign / NH harmful training
# prompts), then for every band and p a fit from those activations (no model run) and the
# refusal evaluation on a fixed subset (EVAL_LIMIT prompts per set, ≤ EVAL_TOKENS tokens, greedy)
# at each strength (0 = the unsteered model). Prints one Markdown table (mean DSR over the
# harmful sets, XSTest-safe compliance and clean compliance, degenerate shares).
# usage: bench/alphasteer_ablation.sh [NB=1000] [NH=500] [EVAL_LIMIT=20] [EVAL_TOKENS=64] [STRENGTHS=0,1,2]
# env: BANDS (space-separated, default "3-9 7-18 15-24"), PS (default "0.3 0.6 0.9"),
#      SETS (default advbench,jbb,gcg,pair,renellm,xstest_safe), BIN (default target/release/rudder)
set -euo pipefail
cd "$(dirname "$0")/.."
NB="${1:-1000}"; NH="${2:-500}"; LIM="${3:-20}"; TOK="${4:-64}"; ST="${5:-0,1,2}"
BANDS="${BANDS:-3-9 7-18 15-24}"; PS="${PS:-0.3 0.6 0.9}"
SETS="${SETS:-advbench,jbb,gcg,pair,renellm,xstest_safe}"
BIN="${BIN:-target/release/rudder}"
R=../shared/data/steering/refusal
OUT=bench/out/alphasteer_ablation; mkdir -p "$OUT"
# one capture of every layer: a fit over all layers caches its activations in <out>.acts/
if [ ! -f "$OUT/all.safetensors.acts/harmful.safetensors" ]; then
  $BIN --threads 2 steer alphasteer fit -m smollm2-135m-instruct --layers 0-29 \
    --benign $R/benign_train.json --limit-benign "$NB" --harmful $R/harmful_train_1000.json \
    --limit-harmful "$NH" --out "$OUT/all.safetensors" >/dev/null
fi
ACTS="$OUT/all.safetensors.acts"
for band in $BANDS; do
  for p in $PS; do
    tag="b${band}_p${p}"
    $BIN --threads 2 steer alphasteer fit --benign-acts "$ACTS/benign.safetensors" \
      --harmful-acts "$ACTS/harmful.safetensors" --layers "$band" --p "$p" \
      --out "$OUT/$tag.safetensors" >/dev/null
    /usr/bin/time -f "$tag: %e s" $BIN --threads 2 steer eval-refusal -m smollm2-135m-instruct \
      --steer "$OUT/$tag.safetensors" --data $R --strengths "$ST" \
      --only "$SETS" --limit "$LIM" --max-tokens "$TOK" --batch 32 --out "$OUT/eval_$tag" >/dev/null
  done
done
python3 - "$OUT" $BANDS -- $PS <<'EOF'
import json, sys
out = sys.argv[1]
i = sys.argv.index("--")
bands, ps = sys.argv[2:i], sys.argv[i + 1:]
print("| layers | p | strength | DSR (harmful sets) | XSTest-safe compliance | clean compliance | degenerate (harmful / safe) |")
print("|---|---|---|---|---|---|---|")
none = None
for b in bands:
    for p in ps:
        for line in open(f"{out}/eval_b{b}_p{p}/metrics.jsonl"):
            t = json.loads(line).get("tradeoff")
            if not t:
                continue
            row = (f"{t['dsr_mean']:.3f} | {t['xstest_compliance']:.2f} | {t['xstest_clean_compliance']:.2f} | "
                   f"{t['degenerate_harmful']:.2f} / {t['degenerate_safe']:.2f} |")
            if t["method"] == "none":
                none = none or row
            elif t["method"] == "alphasteer":
                print(f"| {b} | {p} | {t['strength']:g} | {row}")
print(f"| — | — | unsteered | {none}")
EOF
