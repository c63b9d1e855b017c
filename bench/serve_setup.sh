#!/usr/bin/env bash
# Peer and load tools for the serving benchmarks, in their own venv (bench/.venv-serve):
# llama-cpp-python 0.3.36 with its OpenAI-compatible server (built from the sdist with the
# CPU's SIMD; takes several minutes on 2 cores), aiohttp for the load generator, openai.
# -march=native is not used: on VMs that advertise AMX without granting it (seen here), ggml's
# AMX path dies with SIGILL on `tilezero`; the SIMD levels are listed explicitly instead, up to
# what the CPU has (AVX-512/VNNI where present, else AVX2).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-serve
.venv-serve/bin/pip install -q aiohttp openai
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
grep -q avx_vnni /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX_VNNI=ON"
grep -q avx512f /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX512=ON"
grep -q avx512_vnni /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX512_VNNI=ON"
grep -q avx512vbmi /proc/cpuinfo && FLAGS="$FLAGS -DGGML_AVX512_VBMI=ON"
CMAKE_ARGS="$FLAGS" .venv-serve/bin/pip install -q --force-reinstall --no-cache-dir --no-deps \
  --no-binary llama-cpp-python "llama-cpp-python[server]==0.3.36"
.venv-serve/bin/pip install -q "llama-cpp-python[server]==0.3.36" numpy
.venv-serve/bin/python -c "import llama_cpp, aiohttp; print('llama-cpp-python', llama_cpp.__version__)"
