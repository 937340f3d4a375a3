"""The compiled CUDA extension: built, linked, importable, its schemas registered.

CI (no GPU) builds it with ATTN_KERNELS_BUILD_CUDA=1, where a missing extension is a failure;
elsewhere a missing extension skips these tests with the reason the package gives.
"""
import os

import pytest
import torch

from attn_kernels import backends
from conftest import require_cpu_backend


@pytest.fixture(scope="module")
def extension():
    why = backends.cuda_extension_error()
    if why is not None:
        if os.environ.get("ATTN_KERNELS_BUILD_CUDA") == "1":
            pytest.fail(f"ATTN_KERNELS_BUILD_CUDA=1 but {why}")
        pytest.skip(why)
    from attn_kernels import _C

    return _C


def test_schemas_registered(extension):
    ns = torch.ops.attn_kernels_cuda
    assert str(ns.channel_pool.default._schema) == "attn_kernels_cuda::channel_pool(Tensor x, bool with_max) -> (Tensor mean, Tensor max)"
    assert "Tensor? xmax, bool with_dy_sum" in str(ns.channel_grad_reduce.default._schema)
    assert "Tensor? tie_coef" in str(ns.channel_gate_apply.default._schema)


def test_every_triton_primitive_has_a_compiled_twin_with_its_arguments(extension):
    """The backends are interchangeable: each Triton primitive has a CUDA op of the same name
    taking the same arguments in the same order (but those listed as Triton's alone)."""
    import inspect

    from attn_kernels import triton as triton_primitives

    assert set(triton_primitives.TRITON_ONLY) <= set(triton_primitives.__all__)
    for name in set(triton_primitives.__all__) - set(triton_primitives.TRITON_ONLY):
        schema = getattr(torch.ops.attn_kernels_cuda, name).default._schema
        compiled = [a.name for a in schema.arguments]
        interpreted = list(inspect.signature(getattr(triton_primitives, name)).parameters)
        assert compiled == interpreted, name


def test_emulation_has_the_schemas_of_the_extension(extension):
    """The CPU emulation (attn_kernels._emulated) registers the same primitives, from the same
    ops.cpp, in its own library: attn_kernels_emulated, for CPU tensors."""
    require_cpu_backend("cuda")
    from attn_kernels import _emulated  # noqa: F401

    for name in set(dir(torch.ops.attn_kernels_cuda)) - {"name"}:
        compiled = getattr(torch.ops.attn_kernels_cuda, name)
        if not isinstance(compiled, torch._ops.OpOverloadPacket):
            continue
        emulated = getattr(torch.ops.attn_kernels_emulated, name).default._schema
        assert str(emulated) == str(compiled.default._schema).replace("attn_kernels_cuda::", "attn_kernels_emulated::")


def test_build_info_records_architectures(extension):
    info = backends.cuda_build_info()
    assert info.get("cuda_arch_list"), info
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_cpu_tensor_is_refused(extension):
    with pytest.raises(NotImplementedError, match="attn_kernels_cuda::channel_pool"):
        torch.ops.attn_kernels_cuda.channel_pool(torch.ones(1, 1, 2, 2), False)


@pytest.mark.parametrize("arch_list, capability, runs", [
    ("9.0", (9, 0), True),
    ("9.0a", (9, 0), True),  # what the GPU machine's image sets: Hopper-specific code, runs on 9.0
    ("8.0;9.0a", (8, 0), True),
    ("9.0a", (8, 0), False),
    ("9.0a", (10, 0), False),
    ("8.0+PTX", (9, 0), True),  # the driver compiles the PTX
    ("9.0a+PTX", (10, 0), False),  # arch-specific PTX runs on its own capability only
    ("10.0f", (10, 3), True),  # a family: 10.x
    ("10.0f", (12, 0), False),
    ("8.0 8.6", (8, 9), False),
    ("", (7, 5), True),
])
def test_arch_list_runs_on(arch_list, capability, runs):
    from attn_kernels.backends import arch_list_runs_on

    assert arch_list_runs_on(arch_list, *capability) is runs
