#!/usr/bin/env bash
# One command from a fresh clone to a tested install: scripts/setup.sh (.venv, dependencies, the
# build), then the test suite; without a GPU, it then compiles the Triton kernels for sm_90a and
# sm_80 at every specialization the tests launched (python -m attn_kernels.kernel_report). Extra
# arguments go to pytest.
set -euo pipefail
# shellcheck source=scripts/setup.sh
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

step "tests"
# Without a GPU the tests run the Triton kernels in Triton's interpreter, which compiles nothing:
# tests/triton_specs.py records the specialization of each launch (as the compiled launcher would
# build it), and the next step compiles every one of them for sm_90a and sm_80. With a GPU the
# tests run the compiled kernels themselves.
# Without a GPU every test is CPU-bound in one thread: pytest-xdist runs one worker per core.
specs=""
workers=()
if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    specs_dir=$(mktemp -d)
    trap 'rm -rf "$specs_dir"' EXIT
    specs=$specs_dir/triton_specs.jsonl
    workers=(-n auto --dist loadgroup)  # loadgroup: tests/test_distributed.py's group on one worker
fi
ATTN_KERNELS_TRITON_SPECS=$specs python -m pytest "${workers[@]}" "$@"

if [ -n "$specs" ]; then
    step "Triton kernels compiled for sm_90a and sm_80 at the specializations the tests launched"
    if [ -s "$specs" ]; then
        python -m attn_kernels.kernel_report --specs "$specs"
    else
        echo "no Triton launch recorded (none in the selected tests): nothing to compile"
    fi
fi
step "done"
