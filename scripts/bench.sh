#!/usr/bin/env bash
# One command from a fresh clone to the benchmark: scripts/setup.sh (.venv, dependencies, the
# build), then `python -m attn_kernels.bench`: on a GPU, the timings; without one, the ledger
# (bytes and launches of every block, fused and eager, and the occupancy of every launch at the
# real shapes, about 9 minutes on 2 cores). Results go to benchmarks/results/. Extra arguments
# go to the benchmark.
set -euo pipefail
# shellcheck source=scripts/setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pip install --isolated -q --disable-pip-version-check matplotlib  # the PNG plots

step "benchmark"
python -m attn_kernels.bench "$@"
step "done"
