"""Attention transfer (Zagoruyko and Komodakis) as torch.library ops, the whole contract here.

    m[n, hw] = mean over C of |x|^p              channel_power_mean: one read of x
    a        = m / max(||m[n]||_2, 1e-12)        per sample (F.normalize), on the (N, H*W) map
    at_loss  = mean of (a_student - a_teacher)^2

Only the map touches the activation; the normalization and the loss act on (N, H*W) maps, in
float32, through autograd. Forward reads each activation once; backward reads the student once
and writes its gradient (channel_power_mean_backward). The teacher gets no gradient. Saved for
backward: x (the student) only. The kernels are Triton's.
"""
import torch
from torch import Tensor

from .primitives import acc_dtype, fused_op, primitives


@fused_op("attn_kernels::channel_power_mean")
def channel_power_mean(x: Tensor, p: float) -> Tensor:
    """mean over C of |x|^p, (N, H*W) in the accumulator dtype."""
    return primitives("triton").channel_power_mean(x, p)


@channel_power_mean.register_fake
def _(x, p):
    return x.new_empty((x.shape[0], x.shape[2] * x.shape[3]), dtype=acc_dtype(x.dtype))


@fused_op("attn_kernels::channel_power_mean_backward")
def channel_power_mean_backward(dm: Tensor, x: Tensor, p: float) -> Tensor:
    return primitives("triton").channel_power_mean_backward(dm, x, p)


@channel_power_mean_backward.register_fake
def _(dm, x, p):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, p = inputs
    ctx.save_for_backward(x)
    ctx.p = p


def _backward(ctx, dm):
    (x,) = ctx.saved_tensors
    return channel_power_mean_backward(dm.to(acc_dtype(x.dtype)).contiguous(), x, ctx.p), None


channel_power_mean.register_autograd(_backward, setup_context=_setup_context)
