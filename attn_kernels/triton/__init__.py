"""Triton kernels, one file per family, with the signatures of the compiled primitives."""
from .channel_gate import channel_gate_apply, channel_grad_reduce, channel_pool

__all__ = ["channel_gate_apply", "channel_grad_reduce", "channel_pool"]
