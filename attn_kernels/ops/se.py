"""Squeeze-and-Excitation as torch.library ops: the whole contract of the fused SE in one place.

    s = mean_hw(x)                       (add_maxpool: s = 0.5*mean_hw(x) + 0.5*max_hw(x))
    g = gate(W2 @ act(W1 @ s + b1) + b2)  per sample, the bottleneck MLP of timm's SEModule
    y = x * g

Forward:  channel_pool (reads x) -> MLP on (N, C) -> channel_gate_apply (reads x, writes y): 3|x|.
Backward: channel_grad_reduce (reads dy, x) -> MLP backward on (N, C) -> channel_gate_apply
          (reads dy, writes dx): 4|x|; 5|x| with add_maxpool, where the arg-max positions need x.
Saved for backward: x and the (N, C) pooled statistics; the gate is recomputed from them.
The (N, C)-sized MLP runs in float32 (float64 for float64 x) whatever x's dtype.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..activations import ACTIVATIONS
from .channel_gate import acc_dtype, primitives


def _pooled(mean: Tensor, xmax: Tensor, add_maxpool: bool) -> Tensor:
    return 0.5 * mean + 0.5 * xmax if add_maxpool else mean


def _linear(v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A 1x1 conv on a (N, C_in) vector: v @ W.T + b, in v's dtype."""
    w = weight.reshape(weight.shape[0], -1).to(v.dtype)
    return torch.addmm(bias.to(v.dtype), v, w.t()) if bias is not None else v @ w.t()


def _excite(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str):
    """The SE bottleneck on the pooled (N, C) statistics: returns (hidden pre-act, hidden, logits, gate)."""
    h = _linear(pooled, fc1_weight, fc1_bias)
    a = ACTIVATIONS[act].forward(h)
    z = _linear(a, fc2_weight, fc2_bias)
    return h, a, z, ACTIVATIONS[gate].forward(z)


@torch.library.custom_op("attn_kernels::se_forward", mutates_args=())
def se_forward(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    add_maxpool: bool,
    act: str,
    gate: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean, max): the output and the (N, C) statistics backward needs (max is empty
    without add_maxpool)."""
    ops = primitives(backend)
    mean, xmax = ops.channel_pool(x, add_maxpool)
    g = _excite(_pooled(mean, xmax, add_maxpool), fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)[3]
    y = ops.channel_gate_apply(x, g, None, None, None, None)
    return y, mean, xmax


@se_forward.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_maxpool, act, gate, backend):
    stats = (x.shape[0], x.shape[1])
    acc = acc_dtype(x.dtype)
    return torch.empty_like(x), x.new_empty(stats, dtype=acc), x.new_empty(stats if add_maxpool else (0,), dtype=acc)


@torch.library.custom_op("attn_kernels::se_backward", mutates_args=())
def se_backward(
    dy: Tensor,
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    mean: Tensor,
    xmax: Tensor,
    add_maxpool: bool,
    act: str,
    gate: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias); bias gradients are
    returned even for absent biases (the autograd formula drops them)."""
    ops = primitives(backend)
    pooled = _pooled(mean, xmax, add_maxpool)
    h, a, z, g = _excite(pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate)
    dot, ties = ops.channel_grad_reduce(dy, x, xmax if add_maxpool else None)
    dz = dot * ACTIVATIONS[gate].derivative(z)
    w2 = fc2_weight.reshape(fc2_weight.shape[0], -1).to(dz.dtype)
    dh = (dz @ w2) * ACTIVATIONS[act].derivative(h)
    w1 = fc1_weight.reshape(fc1_weight.shape[0], -1).to(dh.dtype)
    dpooled = dh @ w1
    hw = x.shape[2] * x.shape[3]
    if add_maxpool:
        # d/dx of 0.5*mean + 0.5*amax: amax's gradient is shared equally by tied maxima.
        dx = ops.channel_gate_apply(dy, g, 0.5 * dpooled / hw, x, xmax, 0.5 * dpooled / ties)
    else:
        dx = ops.channel_gate_apply(dy, g, dpooled / hw, None, None, None)
    return (
        dx,
        (dh.t() @ pooled).reshape(fc1_weight.shape).to(fc1_weight.dtype),
        dh.sum(0).to(fc1_bias.dtype if fc1_bias is not None else fc1_weight.dtype),
        (dz.t() @ a).reshape(fc2_weight.shape).to(fc2_weight.dtype),
        dz.sum(0).to(fc2_bias.dtype if fc2_bias is not None else fc2_weight.dtype),
    )


@se_backward.register_fake
def _(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax, add_maxpool, act, gate, backend):
    return (
        torch.empty_like(dy),
        torch.empty_like(fc1_weight),
        fc1_weight.new_empty(fc1_weight.shape[:1], dtype=fc1_bias.dtype if fc1_bias is not None else None),
        torch.empty_like(fc2_weight),
        fc2_weight.new_empty(fc2_weight.shape[:1], dtype=fc2_bias.dtype if fc2_bias is not None else None),
    )


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_maxpool, act, gate, backend = inputs
    _, mean, xmax = output
    ctx.mark_non_differentiable(mean, xmax)
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax)
    ctx.config = (add_maxpool, act, gate, backend)


def _backward(ctx, dy, _dmean, _dmax):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax = ctx.saved_tensors
    # The kernels read dy and x in one memory order; autograd may hand dy in another.
    layout = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    dx, dw1, db1, dw2, db2 = se_backward(
        dy.contiguous(memory_format=layout), x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, mean, xmax, *ctx.config
    )
    return (
        dx,
        dw1,
        db1 if fc1_bias is not None else None,
        dw2,
        db2 if fc2_bias is not None else None,
        None,
        None,
        None,
        None,
    )


se_forward.register_autograd(_backward, setup_context=_setup_context)
