#!/usr/bin/env bash
# Install RecBole 1.2.1 (the peer for the CF benchmark) into bench/.venv, from PyPI.
# It needs numpy<2 and scipy 1.12 (RecBole 1.2.1 uses removed numpy/scipy APIs).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "recbole==1.2.1" "numpy<2" "scipy>=1.12,<1.13" torch "ray<3" "setuptools<70" 2>&1 | tail -3
.venv/bin/python -c "import recbole, torch; print('recbole', recbole.__version__, 'torch', torch.__version__)"
