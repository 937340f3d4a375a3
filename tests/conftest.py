"""Test setup shared by every test file.

- Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
- Tests marked `gpu` are skipped (never passed) where there is no CUDA GPU.
- `poisoned` makes every fresh allocation NaN (torch's deterministic mode fills uninitialized
  memory), so an output element a kernel forgets to write cannot pass by luck; it also turns on
  torch.use_deterministic_algorithms, which rejects nondeterministic ops.
- `kernel_backend` runs a test on each kernel backend: on a GPU both; on CPU tensors 'triton' in
  Triton's interpreter, and 'cuda', the CUDA kernels of csrc/ under their CPU emulation
  (attn_kernels._emulated; scripts/test.sh builds it, and there its absence is a failure). Every
  emulated launch runs its threads in two orders and fails unless the results agree bitwise.
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
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request):
    return request.param if HAS_GPU else require_cpu_backend(request.param)


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
