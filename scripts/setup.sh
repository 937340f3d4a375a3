#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/bench.sh: from a fresh clone to a built install. Creates
# .venv, installs the pinned CUDA build of torch with triton and timm, builds attn_kernels with its
# CUDA extension (no GPU needed to compile) and, without a GPU, the CPU emulation of the CUDA
# kernels. Prints each step with the seconds since the start.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s  [%ds]\n' "$*" "$SECONDS"; }  # [seconds since the start]

step "virtual environment .venv"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

step "dependencies (torch 2.13.0 CUDA build, triton 3.7.1, timm 1.0.31, segmentation_models_pytorch 0.6.0)"
# --isolated ignores local pip configuration, which may point at a CPU-only torch wheel: the CUDA
# build of torch carries the headers and libraries the extension compiles against.
python -m pip install --isolated -q --disable-pip-version-check \
    torch==2.13.0 torchvision==0.28.0 triton==3.7.1 timm==1.0.31 segmentation-models-pytorch==0.6.0 numpy ninja \
    pytest pytest-benchmark pytest-xdist setuptools wheel

step "build attn_kernels"
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    # nvcc may be a wrapper outside the toolkit: take the first candidate that has the headers.
    for candidate in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
        if [ -f "$candidate/include/cuda_runtime.h" ]; then export CUDA_HOME=$candidate; break; fi
    done
fi
if [ -n "${CUDA_HOME:-}" ]; then
    export ATTN_KERNELS_BUILD_CUDA=1  # a failed compile is an error here, not a silent fallback
else
    echo "no nvcc found: installing without the CUDA extension (its tests will be skipped)"
fi
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    # No GPU: the CUDA kernels' sources are also built as host C++ (attn_kernels._emulated, no nvcc
    # needed) and the tests run them on CPU tensors under an emulation of CUDA's execution model.
    export ATTN_KERNELS_BUILD_EMULATION=1
fi
python -m pip install --no-build-isolation --no-deps -v -e .  # -v: the build's steps as they run
python -m attn_kernels.info
