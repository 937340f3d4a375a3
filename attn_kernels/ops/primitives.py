"""The activation-sized primitives behind a backend name.

Both kernel backends implement the same functions with the same signatures: the compiled ones as
torch.ops.attn_kernels_cuda.<name> (csrc/; for CPU tensors, the same sources built for the CUDA
emulation, torch.ops.attn_kernels_emulated.<name>), the Triton ones in attn_kernels.triton. Each
kernel file says what its primitives compute.
"""
import functools
from typing import Optional

import torch


def primitives(backend: str, device: Optional[torch.device] = None):
    """The module-like object holding the primitives of a kernel backend; for 'cuda', those that
    run on `device` (CUDA tensors, or CPU tensors in the CUDA emulation)."""
    if backend == "cuda":
        if device is not None and device.type == "cpu":
            from .. import _emulated  # noqa: F401  (registers torch.ops.attn_kernels_emulated)

            return torch.ops.attn_kernels_emulated
        from .. import _C  # noqa: F401  (registers torch.ops.attn_kernels_cuda)

        return torch.ops.attn_kernels_cuda
    if backend == "triton":
        from .. import triton

        return triton
    raise ValueError(f"backend must be 'cuda' or 'triton' for a fused op, got {backend!r}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and the small per-(n, c) math use: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The attention-pooling kernels of both backends hold all channels of a pixel on chip (registers
# in Triton, shared memory in CUDA, whose kernel has the same limit), so C is bounded.
ATTENTION_POOL_MAX_CHANNELS = 4096

# The multi-path kernels (Selective Kernel) unroll one pointer per path, up to this many.
MAX_PATHS = 4


# The namespace of the blocks' ops; ops defined with `define_op` register here.
library = torch.library.Library("attn_kernels", "FRAGMENT")


def define_op(schema: str, impl, fake):
    """The op `attn_kernels::<schema>` with `impl` for CPU and CUDA tensors and `fake` for fake and
    meta tensors; its autograd is an autograd.Function around the call (the op has none).
    The cheapest registration that keeps opcheck, torch.compile(fullgraph=True) and export: a
    call costs the dispatcher alone, where torch.library.custom_op's wrappers and
    register_autograd cost tens of microseconds more (ENVIRONMENT.md's host-cost facts)."""
    name = schema.split("(", 1)[0]
    library.define(schema)
    for key in ("CPU", "CUDA"):
        library.impl(name, impl, key)
    torch.library.register_fake(f"attn_kernels::{name}", fake, lib=library)
    return getattr(torch.ops.attn_kernels, name).default


def fused_op(name: str):
    """torch.library.custom_op(name) for a block's forward or backward, its body run with autocast
    off: the op chooses its dtypes by hand (float32 statistics and per-(n, c) math, x's dtype in
    and out), which an enclosing autocast region would otherwise recast to float16 or bfloat16."""

    def decorate(fn):
        @functools.wraps(fn)
        def body(*args, **kwargs):
            first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]  # x (or a list of them), dy
            with torch.autocast(first.device.type, enabled=False):
                return fn(*args, **kwargs)

        return torch.library.custom_op(name, mutates_args=())(body)

    return decorate
