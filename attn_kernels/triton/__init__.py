"""Triton kernels, one file per family, with the signatures of the compiled primitives."""
from .attention_pool import attention_pool, attention_pool_backward
from .channel_gate import channel_gate_apply, channel_grad_reduce, channel_pool
from .spatial_gate import spatial_gate_apply, spatial_grad_reduce, spatial_pool, spatial_pool_grad_reduce

__all__ = [
    "attention_pool", "attention_pool_backward",
    "channel_gate_apply", "channel_grad_reduce", "channel_pool",
    "spatial_gate_apply", "spatial_grad_reduce", "spatial_pool", "spatial_pool_grad_reduce",
]
