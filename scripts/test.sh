#!/usr/bin/env bash
# One command from a fresh clone to a tested install: creates .venv, installs the pinned CUDA build
# of torch with triton and timm, builds attn_kernels with its CUDA extension (no GPU needed to
# compile), and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== %s\n' "$*"; }

step "virtual environment .venv"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

step "dependencies (torch 2.13.0 CUDA build, triton 3.7.1, timm 1.0.31)"
# --isolated ignores local pip configuration, which may point at a CPU-only torch wheel: the CUDA
# build of torch carries the headers and libraries the extension compiles against.
python -m pip install --isolated -q --disable-pip-version-check \
    torch==2.13.0 torchvision==0.28.0 triton==3.7.1 timm==1.0.31 numpy ninja pytest pytest-benchmark setuptools wheel

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
python -m pip install --no-build-isolation --no-deps -v -e .  # -v: the build's steps as they run
python -m attn_kernels.info

step "tests"
python -m pytest "$@"
