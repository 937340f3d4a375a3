"""Channel gating: SE, ECA and CBAM's channel attention, their whole contract here.

    mean, max = pooled over H*W per (n, c)
    g = gate(mix(pooled))       per sample, on (N, C): see ops/excite.py for the `pool` and `mix`
                                modes (an MLP for SE and CBAM, a conv across channels for ECA)
    y = x * g

One op call per direction (`channel_gate_forward`, `channel_gate_backward`, defined with
torch.library and wrapped by the autograd function `ChannelGate`), the same kernels on both
backends (triton/excite.py, csrc/excite.cu):
forward:  pool_excite (reads x; the last program of each sample computes its gate) -> gate apply
          (reads x, writes y): 2 launches, 3|x|.
backward: grad_excite (reads dy, x; the last program of each sample differentiates the excitation)
          -> the weight gradients summed over N -> gate apply (reads dy, writes dx): 3 launches,
          4|x|; 5|x| when the max is pooled, whose arg-max positions need x again.
Saved for backward: x and the (N, C) statistics; the gate is recomputed from them.
"""
from typing import Optional

import torch
from torch import Tensor

from .excite import uses_max
from .primitives import acc_dtype, define_op, primitives

_FORWARD_SCHEMA = (
    "channel_gate_forward(Tensor x, Tensor? fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
    "str pool, str mix, str act, str gate, str backend) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "channel_gate_backward(Tensor dy, Tensor x, Tensor? fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
    "Tensor? fc2_bias, Tensor mean, Tensor xmax, str pool, str mix, str act, str gate, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, mix, act, gate, backend):
    """(y, mean, max): the output and the (N, C) statistics backward needs (max is empty when the
    pool does not use it). Triton: 2 launches, the excitation inside the reduction's kernel."""
    if backend == "triton":
        from .. import triton as kernels

        stats, mean, xmax = kernels.pool_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, (pool, mix, act, gate))
        return kernels.launch_gate_apply(x, stats), mean, xmax
    ops = primitives(backend, x.device)
    g, mean, xmax = ops.pool_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, mix, act, gate)
    return ops.channel_gate_apply(x, g, None, None, None, None), mean, xmax


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, mix, act, gate, backend):
    stats = (x.shape[0], x.shape[1])
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats if uses_max(pool) else (0,), dtype=acc)


channel_gate_forward = define_op(_FORWARD_SCHEMA, _forward, _forward_fake)


def _backward(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax, pool, mix, act, gate, backend):
    """(dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias); absent weights get empty (0,)
    gradients (the autograd function drops them). Triton: 3 launches."""
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    with_max = uses_max(pool)
    if backend == "triton":
        from .. import triton as kernels

        stats, dweights = kernels.grad_excite(dy, x, *weights, mean, xmax, (pool, mix, act, gate))
        N, C = x.shape[:2]
        dx = kernels.launch_gate_apply(dy, stats, stats, x if with_max else None, xmax if with_max else None,
                                       stats if with_max else None, stat_plane=N * C)
        return (dx, *(d if d is not None else mean.new_empty((0,)) for d in dweights))
    ops = primitives(backend, x.device)
    g, bias, tie, *dweights = ops.grad_excite(dy, x, *weights, mean, xmax, pool, mix, act, gate)
    if with_max:
        dx = ops.channel_gate_apply(dy, g, bias, x, xmax, tie)
    else:
        dx = ops.channel_gate_apply(dy, g, bias, None, None, None)
    return (dx, *dweights)


def _backward_fake(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax, pool, mix, act, gate, backend):
    return (torch.empty_like(dy), *(torch.empty_like(w) if w is not None else mean.new_empty((0,))
                                    for w in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)))


channel_gate_backward = define_op(_BACKWARD_SCHEMA, _backward, _backward_fake)


def nan_where_max_is_nan(bias: Tensor, xmax: Tensor) -> Tensor:
    """bias, NaN where the max is NaN: then no element equals it, and amax's gradient (its share,
    d max / 0 ties, at no element) is 0/0-style NaN over the whole pooled set, as in eager."""
    return torch.where(torch.isnan(xmax), torch.full_like(bias, float("nan")), bias)


def same_layout_as(t: Tensor, like: Tensor) -> Tensor:
    """t in like's memory format: the kernels read a gradient and x in one memory order, and
    autograd may hand the gradient in another."""
    return t.contiguous(memory_format=torch.contiguous_format if like.is_contiguous() else torch.channels_last)


class ChannelGate(torch.autograd.Function):
    """The block's autograd: one op call forward, one backward. The five strings travel as one
    argument (config): each argument of apply costs host time."""

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, config):
        y, mean, xmax = channel_gate_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *config)
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax)
        ctx.config = config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, *weights, mean, xmax = ctx.saved_tensors
        dx, *dweights = channel_gate_backward(same_layout_as(dy, x), x, *weights, mean, xmax, *ctx.config)
        return (dx, *(d if w is not None else None for d, w in zip(dweights, weights)), None)


def channel_gate(x: Tensor, fc1_weight: Optional[Tensor], fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                 fc2_bias: Optional[Tensor], pool: str, mix: str, act: str, gate: str, backend: str) -> Tensor:
    """y = x * gate(mix(pool(x))), differentiable in x and every weight."""
    return ChannelGate.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, (pool, mix, act, gate, backend))
