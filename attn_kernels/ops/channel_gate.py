"""The channel-gate primitives behind a backend name.

Both kernel backends implement the same three functions with the same signatures:
  channel_pool(x, with_max) -> (mean, max)
  channel_grad_reduce(dy, x, xmax) -> (dot, ties)
  channel_gate_apply(a, gate, bias, x, xmax, tie_coef) -> out
(csrc/channel_gate.cu and attn_kernels/triton/channel_gate.py say what they compute).
"""
import torch


def primitives(backend: str):
    """The module-like object holding the three primitives of a kernel backend."""
    if backend == "cuda":
        from .. import _C  # noqa: F401  (registers torch.ops.attn_kernels_cuda)

        return torch.ops.attn_kernels_cuda
    if backend == "triton":
        from ..triton import channel_gate

        return channel_gate
    raise ValueError(f"backend must be 'cuda' or 'triton' for a fused op, got {backend!r}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and the per-(n, c) math use: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
