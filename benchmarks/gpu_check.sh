#!/usr/bin/env bash
# Everything GPU-related, in one go, on a GPU machine without network access (torch, triton, timm
# and pytest already installed), each step time-boxed so that the whole fits a lent GPU's minutes:
#   build   build and install attn_kernels in place, the CUDA extension compiled for the visible GPU
#   info    python -m attn_kernels.info: what was built, and which backends run here
#   tests   the whole suite, GPU tests first, in parallel processes (pytest-xdist)
#   bench   python -m attn_kernels.bench: latency and memory of every block, CSV and PNG
#   train   python -m attn_kernels.bench_train: training steps of whole timm models, CSV and PNG
# A failed build stops the script (what follows would run stale or missing kernels); a failed or
# timed-out later step does not, but makes the script exit non-zero at the end.
#
# Usage: benchmarks/gpu_check.sh [options]
#   --steps LIST        comma-separated steps to run (default: build,info,tests,bench,train)
#   --tests-s S         stop the tests after S seconds (SIGINT: pytest still prints its summary)
#   --bench-s S         start no benchmark case after S seconds (bench --time-budget)
#   --train-s S         start no training-benchmark model after S seconds (bench_train --time-budget)
#   --workers K         test processes (default: the number of cores, at most 12)
#   --bench-args "..."  more options of python -m attn_kernels.bench (e.g. "--dtypes bf16 --batch 32")
#   --train-args "..."  more options of python -m attn_kernels.bench_train (e.g. "--quick")
# Output: gpu_check.log, tests.log, bench.{csv,png}, train_step.{csv,png} in $OUT when it is set (a
# lent GPU's result folder: written as the run goes, so a run cut short returns what it did), else
# in benchmarks/results/<gpu>-<UTC date-time>/.
# Environment: PYTHON (default: python); ATTN_KERNELS_COMMIT, the commit to name in logs and CSVs
# where the tree has no git history (default: git rev-parse).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, wherever this is run from
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1  # the log grows as the run goes

steps=build,info,tests,bench,train
tests_s="" bench_s="" train_s="" bench_args="" train_args=""
workers=$(( $(nproc) < 12 ? $(nproc) : 12 ))
while [[ $# -gt 0 ]]; do
    case $1 in
        --steps) steps=$2 ;;
        --tests-s) tests_s=$2 ;;
        --bench-s) bench_s=$2 ;;
        --train-s) train_s=$2 ;;
        --workers) workers=$2 ;;
        --bench-args) bench_args=$2 ;;
        --train-args) train_args=$2 ;;
        *) echo "gpu_check.sh: unknown option $1 (see the comment at the top of this script)" >&2; exit 2 ;;
    esac
    shift 2
done
for step_name in ${steps//,/ }; do
    case $step_name in
        build | info | tests | bench | train) ;;
        *) echo "gpu_check.sh: --steps: unknown step '$step_name' (build, info, tests, bench, train)" >&2; exit 2 ;;
    esac
done

if [[ -n "${OUT:-}" ]]; then
    results=$OUT
else
    gpu_slug=$("$PYTHON" -c '
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))')
    # Date and time, so a second run the same day gets its own folder rather than mixing into the first.
    results="benchmarks/results/${gpu_slug}-$(date -u +%Y%m%d-%H%M%S)"
fi
mkdir -p "$results"

wants() { [[ ",$steps," == *",$1,"* ]]; }

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

# `timeout` when a limit is given: SIGINT first (pytest and python print what they have), SIGKILL
# 30 s later.
limited() {
    local seconds=$1
    shift
    if [[ -n "$seconds" ]]; then timeout --signal=INT --kill-after=30 "$seconds" "$@"; else "$@"; fi
}

# The test log is a file of its own: thousands of lines, one per test.
run_tests() {
    limited "$tests_s" "$PYTHON" -m pytest -n "$workers" -v -rfEs tests >"$results/tests.log" 2>&1
}

main() {
    local failed=""
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${ATTN_KERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, steps $steps"
    echo "results: $results"
    nvidia-smi || echo "(nvidia-smi not available)"
    "$PYTHON" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")' || true

    if wants build && ! step build env MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-deps --no-build-isolation -v -e .; then
        echo "gpu_check: the build failed; not running the other steps."
        return 1
    fi
    if wants info; then step info "$PYTHON" -m attn_kernels.info || failed+=" info"; fi
    if wants tests; then
        step tests run_tests || failed+=" tests"
        grep -E "^(FAILED|ERROR)|passed|failed" "$results/tests.log" | tail -n 40 || true
    fi
    if wants bench; then
        # shellcheck disable=SC2086  # bench_args is a list of options
        step bench limited "${bench_s:+$((bench_s + 120))}" "$PYTHON" -m attn_kernels.bench --plot \
            --csv "$results/bench.csv" ${bench_s:+--time-budget "$bench_s"} $bench_args || failed+=" bench"
    fi
    if wants train; then
        # shellcheck disable=SC2086  # train_args is a list of options
        step train limited "${train_s:+$((train_s + 120))}" "$PYTHON" -m attn_kernels.bench_train --plot \
            --csv "$results/train_step.csv" ${train_s:+--time-budget "$train_s"} $train_args || failed+=" train"
    fi

    echo
    if [[ -n "$failed" ]]; then
        echo "gpu_check: FAILED:$failed (logs, CSVs and plots in $results)"
        return 1
    fi
    echo "gpu_check: all steps passed (logs, CSVs and plots in $results)"
}

# tee keeps the log as the run goes; pipefail makes the pipeline's status main's.
main 2>&1 | tee "$results/gpu_check.log"
