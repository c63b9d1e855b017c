"""Run RecBole 1.2.1 on a split written by `rudder data split --to atomic` and report timings.

Usage: recbole_run.py DATA_DIR DATASET MODEL EPOCHS OUT_JSON
DATA_DIR/DATASET holds DATASET.train.inter / .valid.inter / .test.inter (RecBole benchmark files),
so RecBole trains and evaluates on exactly the interactions rudder uses.
"""
import json, os, re, sys, time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from recbole.quick_start import run_recbole  # noqa: E402

data_dir, dataset, model, epochs, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
config = {
    "data_path": data_dir,
    "benchmark_filename": ["train", "valid", "test"],
    "load_col": {"inter": ["user_id", "item_id"]},
    "use_gpu": False,
    "worker": 0,
    "seed": 2020,
    "reproducibility": True,
    "epochs": epochs,
    "train_batch_size": 2048,
    "learning_rate": 1e-3,
    "embedding_size": 64,
    "n_layers": 3,
    "reg_weight": 1e-5,
    "eval_step": 1,
    "stopping_step": 1000,
    "topk": [10, 20],
    "metrics": ["Recall", "NDCG", "Hit", "Precision", "MRR"],
    "valid_metric": "Recall@20",
    "eval_batch_size": 4096,
    "show_progress": False,
    "state": "INFO",
    "checkpoint_dir": os.path.join(os.path.dirname(out), "recbole-saved"),
    "log_wandb": False,
}
t0 = time.time()
res = run_recbole(model=model, dataset=dataset, config_dict=config)
total = time.time() - t0
# RecBole logs "epoch N training [time: Xs, ..." and "epoch N evaluating [time: Ys, ..."
log_dir = "log"
logs = []
for root, _, files in os.walk(log_dir):
    logs += [os.path.join(root, f) for f in files if f.endswith(".log")]
text = open(max(logs, key=os.path.getmtime)).read()
train_t = [float(x) for x in re.findall(r"training \[time: ([0-9.]+)s", text)]
eval_t = [float(x) for x in re.findall(r"evaluating \[time: ([0-9.]+)s", text)]
json.dump(
    {
        "tool": "recbole",
        "model": model,
        "epochs": len(train_t),
        "seconds_per_epoch": sum(train_t) / max(len(train_t), 1),
        "seconds_per_eval": sum(eval_t) / max(len(eval_t), 1),
        "total_seconds": total,
        "best_valid": {k: float(v) for k, v in res["best_valid_result"].items()},
        "test": {k: float(v) for k, v in res["test_result"].items()},
    },
    open(out, "w"),
    indent=1,
)
