#!/usr/bin/env bash
# Prepare the public AdvDrop reference (Arthurma71/AdvDrop) to run on this CPU-only machine,
# beside rudder, for the time-per-epoch comparison in docs/benchmarks.md. Nothing of it enters
# the repository: it lives in REF (default /tmp/advdrop-ref).
#
# usage: bench/advdrop_ref_setup.sh SRC [REF]
#   SRC  a checkout of https://github.com/Arthurma71/AdvDrop (or a bare mirror of it)
#
# Local changes (all needed only because the reference targets CUDA, Python 3.7 and PyG ≤ 2.2):
#   - `.cuda(x)` → `.to(x)`, `--cuda` takes a device string (default cpu),
#     `torch.cuda.FloatTensor(n).uniform_()` → `torch.rand(n)`,
#     `torch.sparse.FloatTensor(i, v, s)` → `torch.sparse_coo_tensor(i, v, s)`;
#   - t_sne_visualization.py's import of INV_LGN_DUAL removed (model.py has no such class, so
#     run_AdvDrop.py cannot start as published);
#   - the mask network's propagate() override calls PyG's private __check_input__/__collect__/
#     __user_args__, renamed _check_input/_collect/_user_args in PyG 2.3 (pure-torch scatter);
#   - tensorflow imports dropped (its NullContextmanager = contextlib.nullcontext; util/tool.py's
#     tf helpers are never called);
#   - torch_geometric 2.3.1 (the first with a pure-torch scatter), put on PYTHONPATH from
#     REF/.pyg; `torch_scatter.scatter` → `torch_geometric.utils.scatter` (the same reduction in
#     pure torch); the torch_sparse imports dropped (only classes this run never builds use them);
#   - `np.reshape(x, newshape=…)` → positional (numpy 2);
#   - a collections.Iterable alias for reckit on Python 3.11; its Cython evaluator built in place.
# The Python environment is bench/.venv-lm (bench/lm_setup.sh) plus tensorboard.
set -euo pipefail
SRC="${1:?usage: bench/advdrop_ref_setup.sh SRC [REF]}"
REF="${2:-/tmp/advdrop-ref}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/bench/.venv-lm/bin/python"
[ -x "$PY" ] || { echo "run bench/lm_setup.sh first (needs $PY)" >&2; exit 1; }
"$PY" -m pip install -q tensorboard
"$ROOT/bench/ref_checkout.sh" "$SRC" "$REF"
cd "$REF"
sed -i 's/\.cuda(\([^)]*\))/.to(\1)/g' *.py module/*.py util/*.py
sed -i 's/torch\.cuda\.FloatTensor(len(values))\.uniform_()/torch.rand(len(values))/' model.py
sed -i 's/torch\.sparse\.FloatTensor(index\.t(), values, size)/torch.sparse_coo_tensor(index.t(), values, size)/' model.py
sed -i 's/ INV_LGN_DUAL,//' t_sne_visualization.py   # imports a class model.py does not define
sed -i 's/self\.__check_input__(/self._check_input(/; s/self\.__collect__(self\.__user_args__/self._collect(self._user_args/' module/mask_model.py
sed -i "s/parser.add_argument('--cuda', type=int, default=0,/parser.add_argument('--cuda', type=str, default='cpu',/" parse.py
sed -i 's/, newshape=/, /' evaluator/backend/cpp/uni_evaluator.py evaluator/backend/python/uni_evaluator.py   # numpy 2
"$PY" -m pip install -q --no-deps --target .pyg torch_geometric==2.3.1
mkdir -p .shim
sed -i 's/^from tensorflow.python.framework.ops import NullContextmanager/from contextlib import nullcontext as NullContextmanager/' evaluator/backend/cpp/uni_evaluator.py
sed -i 's/^import tensorflow as tf/tf = None  # tensorflow: only in helpers the AdvDrop path never calls/' util/tool.py
sed -i 's/^from torch_scatter import scatter/from torch_geometric.utils import scatter/' model.py module/mask_model.py
sed -i 's/^import torch_sparse$/torch_sparse = None  # only INV_LGN (not run here) uses it/; s/^from torch_sparse import SparseTensor, matmul$/from torch_geometric.typing import SparseTensor; matmul = None/' model.py
sed -i 's/^from torch_sparse import SparseTensor, matmul, set_diag$/from torch_geometric.typing import SparseTensor; matmul = set_diag = None/' module/mask_model.py
cat > .shim/sitecustomize.py <<'EOF'
import collections, collections.abc
for n in ('Iterable', 'Mapping', 'MutableMapping', 'Sequence', 'Callable'):
    setattr(collections, n, getattr(collections.abc, n))
EOF
"$PY" setup.py build_ext --inplace > /dev/null
mkdir -p data
[ -s Data/yelp2018.new.zip ] && unzip -o -q Data/yelp2018.new.zip -d data/
echo "reference ready in $REF (run with PYTHONPATH=.pyg:.shim $PY run_AdvDrop.py …)"
