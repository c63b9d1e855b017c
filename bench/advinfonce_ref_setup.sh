#!/usr/bin/env bash
# Prepare the public AdvInfoNCE reference (LehengTHU/AdvInfoNCE, e7c0416) to run on this CPU-only
# machine beside rudder (docs/benchmarks.md, "AdvInfoNCE beside its reference code"). Nothing of
# it enters the repository: it lives in REF (default /tmp/advinfonce-ref).
#
# usage: bench/advinfonce_ref_setup.sh SRC [REF]
#   SRC  a checkout of https://github.com/LehengTHU/AdvInfoNCE (or a bare mirror of it)
#
# Local changes (all needed only because the reference targets CUDA, Python 3.7, numpy 1 and
# TensorFlow 1.14); none touches the model, the loss, the sampler or the evaluator's maths:
#   - `.cuda(x)` / `.cuda()` → `.to(x)` / no-op, `--cuda` takes a device string (default cpu);
#   - `torch.sparse.FloatTensor(i, v, s)` → `torch.sparse_coo_tensor(i, v, s)`;
#   - the evaluator's TensorFlow import of NullContextmanager → contextlib.nullcontext;
#   - `np.reshape(x, newshape=…)` → positional (numpy 2);
#   - collections.Iterable & co. aliased for reckit 0.2.4 on Python 3.11, and numpy's legacy
#     scalar printing (its log reader parses `0.07`, not numpy 2's `np.float32(0.07)`), in a
#     sitecustomize shim;
#   - its Cython evaluator built in place (setup.py build_ext --inplace), as its README says.
# The Python environment is bench/.venv-lm (bench/lm_setup.sh) plus faiss-cpu (imported by
# model.py for NCL), matplotlib, pandas, Cython and reckit 0.2.4 (built without isolation).
set -euo pipefail
SRC="${1:?usage: bench/advinfonce_ref_setup.sh SRC [REF]}"
REF="${2:-/tmp/advinfonce-ref}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/bench/.venv-lm/bin/python"
[ -x "$PY" ] || { echo "run bench/lm_setup.sh first (needs $PY)" >&2; exit 1; }
"$PY" -m pip install -q faiss-cpu matplotlib pandas cython setuptools
if ! "$PY" -c "import reckit" 2>/dev/null; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-build-isolation -d "$tmp" reckit==0.2.4
  "$PY" -m pip install -q --no-build-isolation "$tmp"/reckit-0.2.4.tar.gz
fi
"$ROOT/bench/ref_checkout.sh" "$SRC" "$REF"
cd "$REF"
sed -i 's/\.cuda(\([^)][^)]*\))/.to(\1)/g; s/\.cuda()//g' *.py util/*.py evaluator/*.py
sed -i 's/torch\.sparse\.FloatTensor(/torch.sparse_coo_tensor(/' data.py model.py
sed -i "s/parser.add_argument('--cuda', type=int, default=0,/parser.add_argument('--cuda', type=str, default='cpu',/" parse.py
sed -i 's/^from tensorflow.python.framework.ops import NullContextmanager/from contextlib import nullcontext as NullContextmanager/' evaluator/backend/cpp/uni_evaluator.py
sed -i 's/, newshape=/, /' evaluator/backend/cpp/uni_evaluator.py evaluator/backend/python/uni_evaluator.py
mkdir -p .shim
cat > .shim/sitecustomize.py <<'PY'
import collections, collections.abc
for n in ('Iterable', 'Mapping', 'MutableMapping', 'Sequence', 'Callable'):
    setattr(collections, n, getattr(collections.abc, n))
try:  # numpy 2 prints scalars as np.float32(…), which the reference's log reader cannot parse
    import numpy
    numpy.set_printoptions(legacy="1.25")
except Exception:
    pass
PY
"$PY" setup.py build_ext --inplace > /dev/null
echo "reference ready in $REF (run with PYTHONPATH=.shim $PY train_AdvInfoNCE.py …)"
