"""Test setup shared by every test file.

- Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
- Tests marked `gpu` are skipped (never passed) where there is no CUDA GPU; tests marked
  `cpu_kernels` (kernels on CPU tensors) are skipped where there is one.
- `poisoned` makes every fresh allocation NaN (torch's deterministic mode fills uninitialized
  memory), so an output element a kernel forgets to write cannot pass by luck; it also turns on
  torch.use_deterministic_algorithms, which rejects nondeterministic ops.
- `kernel_backend` runs a test on each kernel backend: on a GPU both; on CPU tensors 'triton' in
  Triton's interpreter, and 'cuda', the CUDA kernels of csrc/ under their CPU emulation
  (attn_kernels._emulated; scripts/test.sh builds it, and there its absence is a failure). Every
  emulated launch runs its threads in two orders and fails unless the results agree bitwise.
  `cpu_kernel_backend` is the same for tests on CPU tensors: skipped where a GPU is present.
"""
import os

import pytest
import torch

pytest_plugins = ["triton_specs"]  # ATTN_KERNELS_TRITON_SPECS=FILE records the Triton launches

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
if os.environ.get("PYTEST_XDIST_WORKER"):
    # scripts/test.sh and benchmarks/gpu_check.sh run about one pytest-xdist worker per core: torch's
    # own threads would oversubscribe them.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        # The GPU tests first: on a GPU lent for minutes, they are what a run cut short must have done.
        items.sort(key=lambda item: "gpu" not in item.keywords)
        marker, reason = "cpu_kernels", ("runs the kernels on CPU tensors, in Triton's interpreter or the CUDA "
                                         "emulation, neither of which runs where a GPU is present")
    else:
        marker, reason = "gpu", "needs a CUDA GPU; none is visible"
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request):
    """A kernel backend for a test whose tensors are CUDA tensors where a GPU is present."""
    return request.param if HAS_GPU else require_cpu_backend(request.param)


@pytest.fixture(params=["triton", "cuda"])
def cpu_kernel_backend(request):
    """A kernel backend for a test on CPU tensors: skipped where a GPU is present, since neither
    Triton's interpreter nor the CUDA emulation runs there (tests/test_gpu.py runs the kernels)."""
    return require_cpu_backend(request.param)


def require_cpu_backend(backend: str) -> str:
    """`backend`, if it runs on CPU tensors here; otherwise skip (or fail, where the test script
    built the CUDA emulation and asked for it with ATTN_KERNELS_BUILD_EMULATION=1)."""
    from attn_kernels import backends

    why = backends.unavailable_reason(backend, torch.empty(1, 1, 1, 1))
    if why is not None:
        if backend == "cuda" and os.environ.get("ATTN_KERNELS_BUILD_EMULATION") == "1":
            pytest.fail(f"ATTN_KERNELS_BUILD_EMULATION=1 but {why}")
        pytest.skip(why)
    return backend


@pytest.fixture
def poisoned():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _restore_backend():
    import attn_kernels

    previous = attn_kernels.get_backend()
    yield
    attn_kernels.set_backend(previous)
