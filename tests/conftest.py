"""Test setup shared by every test file.

- Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
- Tests marked `gpu` are skipped (never passed) where there is no CUDA GPU.
- `poisoned` makes every fresh allocation NaN (torch's deterministic mode fills uninitialized
  memory), so an output element a kernel forgets to write cannot pass by luck; it also turns on
  torch.use_deterministic_algorithms, which rejects nondeterministic ops.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
