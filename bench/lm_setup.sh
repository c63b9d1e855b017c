#!/usr/bin/env bash
# Peer tools for the language-model benchmarks, in their own venv (bench/.venv-lm):
# HF transformers (+ gguf, accelerate), sentence-transformers, llama-cpp-python 0.3.36 (built
# from the sdist with the CPU's SIMD; takes minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-lm
.venv-lm/bin/pip install -q "torch==2.15.0" transformers gguf accelerate sentence-transformers numpy safetensors
.venv-lm/bin/pip install -q --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
