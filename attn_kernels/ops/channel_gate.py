"""Channel gating as torch.library ops: SE, ECA and CBAM's channel attention, their whole contract here.

    mean, max = pooled over H*W per (n, c)
    g = gate(mix(pooled))       per sample, on (N, C): see ops/excite.py for the `pool` and `mix`
                                modes (an MLP for SE and CBAM, a conv across channels for ECA)
    y = x * g

Forward:  channel_pool (reads x) -> excite -> channel_gate_apply (reads x, writes y): 3|x|.
Backward: channel_grad_reduce (reads dy, x) -> excite backward -> channel_gate_apply (reads dy,
          writes dx): 4|x|; 5|x| when the max is pooled, whose arg-max positions need x again.
Saved for backward: x and the (N, C) statistics; the gate is recomputed from them.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .excite import excite, excite_backward, uses_max
from .primitives import acc_dtype, fused_op, primitives


@fused_op("attn_kernels::channel_gate_forward")
def channel_gate_forward(
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    pool: str,
    mix: str,
    act: str,
    gate: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean, max): the output and the (N, C) statistics backward needs (max is empty
    when the pool does not use it)."""
    ops = primitives(backend, x.device)
    mean, xmax = ops.channel_pool(x, uses_max(pool))
    g = excite(mix, pool, mean, xmax, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate).gate
    y = ops.channel_gate_apply(x, g, None, None, None, None)
    return y, mean, xmax


@channel_gate_forward.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, mix, act, gate, backend):
    stats = (x.shape[0], x.shape[1])
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats if uses_max(pool) else (0,), dtype=acc)


@fused_op("attn_kernels::channel_gate_backward")
def channel_gate_backward(
    dy: Tensor,
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    mean: Tensor,
    xmax: Tensor,
    pool: str,
    mix: str,
    act: str,
    gate: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias); bias gradients are
    returned even for absent biases, fc1 gradients are empty without fc1_weight (the autograd
    formula drops them)."""
    ops = primitives(backend, x.device)
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    e = excite(mix, pool, mean, xmax, *weights, act, gate)
    with_max = uses_max(pool)
    dot, ties, _ = ops.channel_grad_reduce(dy, x, xmax if with_max else None, False)
    dmean, dmax, *dweights = excite_backward(mix, pool, e, dot, *weights, act, gate)
    hw = x.shape[2] * x.shape[3]
    bias = dmean / hw if dmean is not None else torch.zeros_like(dot)
    if with_max:
        # amax's gradient is shared equally by tied maxima.
        dx = ops.channel_gate_apply(dy, e.gate, nan_where_max_is_nan(bias, xmax), x, xmax, dmax / ties)
    else:
        dx = ops.channel_gate_apply(dy, e.gate, bias, None, None, None)
    return (dx, *dweights)


@channel_gate_backward.register_fake
def _(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax, pool, mix, act, gate, backend):
    if fc1_weight is None:
        dfc1 = (mean.new_empty((0,)), mean.new_empty((0,)))
    else:
        dfc1 = (
            torch.empty_like(fc1_weight),
            fc1_weight.new_empty(fc1_weight.shape[:1], dtype=fc1_bias.dtype if fc1_bias is not None else None),
        )
    return (
        torch.empty_like(dy),
        *dfc1,
        torch.empty_like(fc2_weight),
        fc2_weight.new_empty(fc2_weight.shape[:1], dtype=fc2_bias.dtype if fc2_bias is not None else None),
    )


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, mix, act, gate, backend = inputs
    _, mean, xmax = output
    ctx.mark_non_differentiable(mean, xmax)
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax)
    ctx.config = (pool, mix, act, gate, backend)


def nan_where_max_is_nan(bias: Tensor, xmax: Tensor) -> Tensor:
    """bias, NaN where the max is NaN: then no element equals it, and amax's gradient (its share,
    d max / 0 ties, at no element) is 0/0-style NaN over the whole pooled set, as in eager."""
    return torch.where(torch.isnan(xmax), torch.full_like(bias, float("nan")), bias)


def same_layout_as(t: Tensor, like: Tensor) -> Tensor:
    """t in like's memory format: the kernels read a gradient and x in one memory order, and
    autograd may hand the gradient in another."""
    return t.contiguous(memory_format=torch.contiguous_format if like.is_contiguous() else torch.channels_last)


def _backward(ctx, dy, _dmean, _dmax):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = channel_gate_backward(
        same_layout_as(dy, x), x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax, *ctx.config
    )
    return (
        dx,
        dw1 if fc1_weight is not None else None,
        db1 if fc1_bias is not None else None,
        dw2,
        db2 if fc2_bias is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


channel_gate_forward.register_autograd(_backward, setup_context=_setup_context)
