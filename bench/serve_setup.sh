#!/usr/bin/env bash
# Peer and load tools for the serving benchmarks, in their own venv (bench/.venv-serve):
# llama-cpp-python 0.3.36 with its OpenAI-compatible server (built from the sdist with the
# CPU's SIMD; takes several minutes on 2 cores), aiohttp for the load generator, openai.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-serve
.venv-serve/bin/pip install -q aiohttp openai
CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-serve/bin/pip install -q --no-binary llama-cpp-python \
  "llama-cpp-python[server]==0.3.36"
.venv-serve/bin/python -c "import llama_cpp, aiohttp; print('llama-cpp-python', llama_cpp.__version__)"
