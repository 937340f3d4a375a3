"""Triton kernels, one file per family, with the signatures of the compiled primitives."""
from .channel_gate import channel_gate_apply, channel_grad_reduce, channel_pool
from .spatial_gate import spatial_gate_apply, spatial_grad_reduce, spatial_pool, spatial_pool_grad_reduce

__all__ = [
    "channel_gate_apply", "channel_grad_reduce", "channel_pool",
    "spatial_gate_apply", "spatial_grad_reduce", "spatial_pool", "spatial_pool_grad_reduce",
]
