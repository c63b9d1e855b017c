#!/usr/bin/env bash
# rudder vs RecBole 1.2.1 on ML-1M (from the wheel), same split, same configuration:
# d=64, 3 layers (LightGCN), BPR with one uniform negative, batch 2048, Adam lr 1e-3, reg 1e-5,
# full-ranking Recall/NDCG@10/20 every epoch, 2 threads. Peak RSS by /usr/bin/time -v.
#
#   bench/cf_vs_recbole.sh [EPOCHS_LIGHTGCN] [EPOCHS_MF]
#
# Needs: bench/recbole_setup.sh run once; `rudder assets fetch ml-1m`.
set -euo pipefail
cd "$(dirname "$0")/.."
E_LGN="${1:-5}"
E_MF="${2:-20}"
OUT=bench/out
mkdir -p "$OUT"
export RAYON_NUM_THREADS=2 THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
cargo build --release -q -p rudder
R=target/release/rudder
# one split for both tools (RecBole's ratio 8:1:1 per user, seed 2020), as RecBole benchmark files
[ -f "$OUT/split/ml-1m/ml-1m.train.inter" ] || $R data split ml-1m --to atomic --seed 2020 --out "$OUT/split/ml-1m" > /dev/null
rss() { grep "Maximum resident set size" "$1" | awk '{print $6}'; }
run_rudder() { # model preset epochs
  /usr/bin/time -v $R --threads 2 cf train --data "$OUT/split/ml-1m" --preset "$2" --epochs "$3" --eval-every 1 --patience 0 \
    --out "$OUT/rudder-$1" > "$OUT/rudder-$1.log" 2> "$OUT/rudder-$1.time"
  echo "rudder $1: $(grep 'per epoch' "$OUT/rudder-$1/summary.md"), peak RSS $(rss "$OUT/rudder-$1.time") kB"
}
run_recbole() { # model epochs
  (cd "$OUT" && /usr/bin/time -v ../.venv/bin/python ../recbole_run.py split ml-1m "$1" "$2" "recbole-$1.json" \
    > "recbole-$1.log" 2> "recbole-$1.time")
  echo "recbole $1 done, peak RSS $(rss "$OUT/recbole-$1.time") kB"
}
# SKIP_RECBOLE=1 re-runs only rudder's side against earlier RecBole results
run_rudder lightgcn recbole-lightgcn "$E_LGN"
run_rudder mf recbole-bpr "$E_MF"
if [ -z "${SKIP_RECBOLE:-}" ]; then
  run_recbole BPR "$E_MF"
  run_recbole LightGCN "$E_LGN"
fi
python3 bench/cf_report.py "$OUT"
