#!/usr/bin/env bash
# AdvDrop fidelity and speed: rudder and the public reference (prepared by
# bench/advdrop_ref_setup.sh) train the same configuration on the same ML-100K split with an
# OOD test, one after the other, 2 threads each; prints both tools' test metrics, training
# losses and per-pass times.
# Split: ML-100K ratings ≥ 4, 10% of interactions drawn ∝ pop⁻¹ into test_ood (cf-seeds.md
# §3.5), 8:1:1 for the rest. The reference reads it as `yelpfmt-m100k.new` (its code picks the
# top-20 cut-off for names containing "yelp", and expects extra files for names containing "ml").
# Config: BPR, d 64, 2 layers, lr 5e-3, batch 1024, L2 1e-5, 30 epochs, ARM pass every 5 epochs,
# adv_lr 1e-2, the reference's mask-network defaults.
# usage: bench/advdrop_ref_ml100k.sh   (RUDDER_HOME must hold ml-100k; REF defaults to /tmp/advdrop-ref)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
REF="${REF:-/tmp/advdrop-ref}"
PY="$ROOT/bench/.venv-lm/bin/python"
OUT="$ROOT/bench/out/advdrop-ml100k"
mkdir -p "$OUT"
cargo build --release -q -p rudder
R="target/release/rudder --threads 2"
[ -f "$OUT/split/test_ood.txt" ] || $R data split ml-100k --min-rating 4 --ood-fraction 0.1 --ood-gamma 1.0 --seed 2020 --out "$OUT/split" > /dev/null
D="$REF/data/yelpfmt-m100k.new"
mkdir -p "$D"
cp "$OUT/split/train.txt" "$OUT/split/valid.txt" "$OUT/split/test_ood.txt" "$D/"
cp "$OUT/split/test.txt" "$D/test_id.txt"

rm -rf "$OUT/rudder"
$R cf train --data "$D" --model advdrop --loss bpr --reg 1e-5 --lr 5e-3 --batch-size 1024 --dim 64 \
  --layers 2 --epochs 30 --eval-every 5 --patience 0 --ks 20 --adv-interval 5 --adv-epochs 1 \
  --adv-lr 1e-2 --out "$OUT/rudder" > "$OUT/rudder.log" 2>&1

cd "$REF"
rm -rf weights/yelpfmt-m100k.new runs/yelpfmt-m100k.new
PYTHONPATH=.pyg:.shim OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$PY" run_AdvDrop.py --modeltype AdvDrop \
  --dataset yelpfmt-m100k.new --data_path ./data/ --n_layers 2 --neg_sample 1 --saveID q \
  --lr 5e-3 --batch_size 1024 --regs 1e-5 --embed_size 64 --interval 5 --adv_epochs 1 \
  --adv_lr 1e-2 --epoch 30 --verbose 5 --num_workers 0 > "$OUT/reference.log" 2>&1
cp weights/yelpfmt-m100k.new/AdvDrop/*stats_q.txt "$OUT/reference-stats.txt"

"$PY" - "$OUT" <<'EOF'
import json, re, sys
out = sys.argv[1]
stats = open(f"{out}/reference-stats.txt").read()
ref_loss = {int(e): float(l) for e, l in re.findall(r"^Epoch (\d+) \[[\d.]+s\]: train==\[([\d.]+)=", stats, re.M)}
ref_train = [float(x) for x in re.findall(r"^Epoch \d+ \[([\d.]+)s\]", stats, re.M)]
ref_adv = [float(x) for x in re.findall(r"^Adv Epoch \d+ \[([\d.]+)s\]", stats, re.M)]
final = stats[stats.index("The best epoch is"):]
ref = {n: float(re.search(n + r":\{'recall': np.float32\(([\d.]+)\)", final).group(1)) for n in ("test_id", "test_ood")}
ref_ndcg = {n: float(re.search(n + r":\{.*?'ndcg': np.float32\(([\d.]+)\)", final).group(1)) for n in ("test_id", "test_ood")}
ref_best = int(re.search(r"The best epoch is\s+(\d+)", stats).group(1))
rows = [json.loads(l) for l in open(f"{out}/rudder/metrics.jsonl")]
ep = [r for r in rows if "epoch" in r]
tests = [r for r in rows if "best_epoch" in r]
ru_train = [r["seconds"] - r.get("adv_seconds", 0.0) for r in ep]
ru_adv = [r["adv_seconds"] for r in ep if "adv_seconds" in r]
print("| | reference | rudder |")
print("|---|---|---|")
for i, n in enumerate(("test_id", "test_ood")):
    print(f"| {n} Recall@20 / NDCG@20 | {ref[n]:.4f} / {ref_ndcg[n]:.4f} | {tests[i]['recall@20']:.4f} / {tests[i]['ndcg@20']:.4f} |")
print(f"| best epoch (valid Recall@20) | {ref_best + 1} | {tests[0]['best_epoch'] + 1} |")
for e in (0, 1, 2, 9, 19, 29):
    print(f"| training loss, epoch {e + 1} | {ref_loss[e]:.4f} | {ep[e]['loss']:.4f} |")
mean = lambda v: sum(v) / len(v)
print(f"| training pass, s (mean of {len(ref_train)}) | {mean(ref_train):.2f} | {mean(ru_train):.2f} |")
print(f"| ARM pass, s (mean of {len(ref_adv)}) | {mean(ref_adv):.2f} | {mean(ru_adv):.2f} |")
EOF
