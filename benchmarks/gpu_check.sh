#!/usr/bin/env bash
# Everything GPU-related, in one go, on a GPU machine without network access (torch, triton, timm
# and pytest already installed):
#   1. build and install attn_kernels in place, the CUDA extension compiled for the visible GPU
#   2. python -m attn_kernels.info      what was built, and which backends run here
#   3. python -m pytest -v -rs tests    the whole suite, GPU tests included
#   4. python -m attn_kernels.bench     the latency/memory table, its CSV and PNG
#   5. python -m attn_kernels.bench_train   training steps of whole timm models, eager/patched/compiled
# A failed build stops the script (what follows would run stale or missing kernels); failed tests,
# info or benchmark do not, but make the script exit non-zero at the end.
#
# Usage: benchmarks/gpu_check.sh [benchmark options]    e.g. --quick for short benchmarks (both)
# Output: benchmarks/results/<gpu>-<UTC date-time>/{gpu_check.log,bench.csv,bench.png,train_step.csv,
# train_step.png}; when OUT
# is set, the log is written there as it grows and the CSV and PNG are copied there at the end.
# Environment: PYTHON (default: python).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, wherever this is run from
PYTHON=${PYTHON:-python}

gpu_slug=$("$PYTHON" -c '
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))')
# Date and time, so a second run the same day gets its own folder rather than mixing into the first.
run_dir="benchmarks/results/${gpu_slug}-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$run_dir"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
fi

copy_results_to_out() {
    if [[ -n "${OUT:-}" ]]; then
        for f in "$run_dir"/bench.{csv,png} "$run_dir"/train_step.{csv,png}; do
            if [[ -f "$f" ]]; then cp -f "$f" "$OUT/"; fi
        done
    fi
}
trap copy_results_to_out EXIT  # also after a failed build or an interrupted benchmark

# Runs one step, saying what it runs, how long it took and how it ended; returns its exit status.
step() {
    local name=$1 start=$SECONDS rc=0
    shift
    echo
    echo "=== ${name}: $*"
    "$@" || rc=$?
    echo "=== ${name}: $([[ $rc -eq 0 ]] && echo ok || echo "FAILED (exit $rc)") after $((SECONDS - start)) s"
    return "$rc"
}

main() {
    local failed=""
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "results: $run_dir"
    nvidia-smi || echo "(nvidia-smi not available)"
    "$PYTHON" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")' || true

    if ! step build env MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-deps --no-build-isolation -v -e .; then
        echo "gpu_check: the build failed; not running info, tests or benchmark."
        return 1
    fi
    step info "$PYTHON" -m attn_kernels.info || failed+=" info"
    step tests "$PYTHON" -m pytest -v -rs tests || failed+=" tests"
    step benchmark "$PYTHON" -m attn_kernels.bench --plot --csv "$run_dir/bench.csv" "$@" || failed+=" benchmark"
    local train_args=()
    if [[ " $* " == *" --quick "* ]]; then train_args=(--quick); fi
    step train-benchmark "$PYTHON" -m attn_kernels.bench_train --plot --csv "$run_dir/train_step.csv" \
        "${train_args[@]}" || failed+=" train-benchmark"

    echo
    if [[ -n "$failed" ]]; then
        echo "gpu_check: FAILED:$failed (log, CSV and plot in $run_dir)"
        return 1
    fi
    echo "gpu_check: all steps passed (log, CSV and plot in $run_dir)"
}

# tee keeps the log as the run goes, in the results folder and, when OUT is set, in OUT too, so an
# interrupted run still leaves its log; pipefail makes the pipeline's status main's.
main "$@" 2>&1 | tee "$run_dir/gpu_check.log" ${OUT:+"$OUT/gpu_check.log"}
