"""Global context attention (GCNet) as torch.library ops: the whole contract of GC here.

    context = sum_p softmax_p(conv_attn(x))[p] * x[:, :, p]     'att' pooling (attn_weight given)
            = mean_hw(x)                                        'avg' pooling (no attn_weight)
    t(ctx)  = fc2(act(LayerNorm(fc1(ctx))))                     a transform, per sample, on (N, C)
    y = x * gate(t_scale(context)) + t_add(context)             either term may be absent

One op call per direction (`gc_forward`, `gc_backward`, defined with torch.library and wrapped
by the autograd function `GC`).
Forward:  the pooling (reads x; one pass, online softmax for 'att') -> transforms -> the apply
          (reads x, writes y): 3|x|.
Backward: the reduction (reads dy, x: sum dy*x for the scale, sum dy for the add) -> transforms'
          backward -> the attention backward (reads dy, x, writes dx) or, for 'avg', the gate apply
          (reads dy, writes dx): at most 5|x|.
Triton (triton/gc.py): the per-sample math inside the kernels, 2 launches forward and 3 backward,
every gradient included. cuda (csrc/attention_pool.cu, channel_gate.cu): the transforms, the
split folds and their backward in torch ops between the kernels.
Saved for backward: x, the (N, C) context and the (N,) log-sum-exp of the logits.

A transform's weights come as a list [fc1_weight, fc1_bias, ln_weight, ln_bias, fc2_weight,
fc2_bias] (1x1-conv weights (R, C, 1, 1) and (C, R, 1, 1); LayerNorm over the R hidden units);
an empty list means the term is absent. The transforms run in float32 (float64 for float64 x).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..activations import ACTIVATIONS
from .channel_gate import same_layout_as
from .excite import linear, matrix
from .primitives import acc_dtype, define_op, primitives


class Transform(NamedTuple):
    hidden: Tensor      # fc1(ctx), (N, R)
    rstd: Tensor        # 1 / sqrt(var + eps) of the hidden units, (N, 1)
    normalized: Tensor  # (hidden - mean) * rstd
    pre_act: Tensor     # normalized * ln_weight + ln_bias
    out: Tensor         # fc2(act(pre_act)), (N, C)


def transform(weights: List[Tensor], ctx: Tensor, eps: float, act: str) -> Transform:
    w1, b1, ln_w, ln_b, w2, b2 = weights
    dtype = ctx.dtype
    hidden = linear(ctx, w1, b1)
    centered = hidden - hidden.mean(1, keepdim=True)
    rstd = torch.rsqrt((centered * centered).mean(1, keepdim=True) + eps)
    normalized = centered * rstd
    pre_act = normalized * ln_w.reshape(-1).to(dtype) + ln_b.reshape(-1).to(dtype)
    out = linear(ACTIVATIONS[act].forward(pre_act), w2, b2)
    return Transform(hidden, rstd, normalized, pre_act, out)


def transform_backward(weights: List[Tensor], ctx: Tensor, t: Transform, dout: Tensor, act: str):
    """(d ctx, [d w1, d b1, d ln_w, d ln_b, d w2, d b2]) of out = t(ctx), the gradients in the
    weights' shapes and dtypes."""
    w1, b1, ln_w, ln_b, w2, b2 = weights
    dtype = ctx.dtype
    activated = ACTIVATIONS[act].forward(t.pre_act)
    dw2 = dout.t() @ activated
    dpre = ACTIVATIONS[act].backward(dout @ matrix(w2, dtype), t.pre_act)
    dln_w = (dpre * t.normalized).sum(0)
    dln_b = dpre.sum(0)
    dnorm = dpre * ln_w.reshape(-1).to(dtype)
    dhidden = t.rstd * (dnorm - dnorm.mean(1, keepdim=True)
                        - t.normalized * (dnorm * t.normalized).mean(1, keepdim=True))
    dw1 = dhidden.t() @ ctx
    dctx = dhidden @ matrix(w1, dtype)
    grads = [dw1, dhidden.sum(0), dln_w, dln_b, dw2, dout.sum(0)]
    return dctx, [g.reshape(w.shape).to(w.dtype) for g, w in zip(grads, weights)]


def _attention_weights(x: Tensor, attn_weight: Tensor, attn_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """conv_attn's (1, C, 1, 1) weight and (1,) bias as the kernels take them: (C,) and (1,), acc dtype."""
    acc = acc_dtype(x.dtype)
    weight = attn_weight.reshape(-1).to(acc).contiguous()
    bias = attn_bias.reshape(1).to(acc).contiguous() if attn_bias is not None else weight.new_zeros(1)
    return weight, bias


_FORWARD_SCHEMA = (
    "gc_forward(Tensor x, Tensor? attn_weight, Tensor? attn_bias, Tensor[] scale_weights, Tensor[] add_weights, "
    "float scale_eps, float add_eps, str act, str gate, str backend) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "gc_backward(Tensor dy, Tensor x, Tensor? attn_weight, Tensor? attn_bias, Tensor[] scale_weights, "
    "Tensor[] add_weights, Tensor context, Tensor lse, float scale_eps, float add_eps, str act, str gate, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor[], Tensor[])"
)


def _forward(x, attn_weight, attn_bias, scale_weights, add_weights, scale_eps, add_eps, act, gate, backend):
    """(y, context, lse): the output, the (N, C) context and, for 'att' pooling, the (N,)
    log-sum-exp of the attention logits (empty for 'avg'). Triton: 2 launches."""
    if backend == "triton":
        from .. import triton as kernels

        planes, context, lse = kernels.gc_pool_transform(x, attn_weight, attn_bias, scale_weights, add_weights,
                                                         scale_eps, add_eps, act, gate)
        return kernels.gc_apply(x, planes, bool(add_weights)), context, lse
    ops = primitives(backend, x.device)
    with torch.autocast(x.device.type, enabled=False):  # the small math picks its dtypes by hand
        if attn_weight is not None:
            context, lse = ops.attention_pool(x, *_attention_weights(x, attn_weight, attn_bias))
        else:
            context, _ = ops.channel_pool(x, False)
            lse = context.new_empty((0,))
        if scale_weights:
            g = ACTIVATIONS[gate].forward(transform(scale_weights, context, scale_eps, act).out)
        else:
            g = torch.ones_like(context)
        add = transform(add_weights, context, add_eps, act).out if add_weights else None
        y = ops.channel_gate_apply(x, g, add, None, None, None)
    return y, context, lse


def _forward_fake(x, attn_weight, attn_bias, scale_weights, add_weights, scale_eps, add_eps, act, gate, backend):
    acc = acc_dtype(x.dtype)
    lse_shape = (x.shape[0],) if attn_weight is not None else (0,)
    return torch.empty_like(x), x.new_empty(x.shape[:2], dtype=acc), x.new_empty(lse_shape, dtype=acc)


gc_forward = define_op(_FORWARD_SCHEMA, _forward, _forward_fake)


def _backward(dy, x, attn_weight, attn_bias, scale_weights, add_weights, context, lse, scale_eps, add_eps, act, gate,
              backend):
    """(dx, d attn_weight, d attn_bias, d scale_weights, d add_weights); an absent attention
    weight or bias gets an empty (0,) gradient (the autograd function drops it). d attn_bias is
    zero: a constant added to every logit leaves the softmax unchanged (NaN where the logits'
    gradient holds a NaN, as eager's sum). Triton: 3 launches."""
    if backend == "triton":
        from .. import triton as kernels

        dx, dweight, dbias, dscale, dadd = kernels.gc_grad_transform(
            dy, x, context, lse, attn_weight, attn_bias, scale_weights, add_weights, scale_eps, add_eps, act, gate)
        return (dx, dweight if dweight is not None else context.new_empty((0,)),
                dbias if dbias is not None else context.new_empty((0,)), dscale, dadd)
    ops = primitives(backend, x.device)
    with torch.autocast(x.device.type, enabled=False):
        N, C, H, W = x.shape
        if scale_weights:
            dot, _, dy_sum = ops.channel_grad_reduce(dy, x, None, bool(add_weights))
        else:
            dy_sum = ops.channel_pool(dy, False)[0] * (H * W)
        dcontext = torch.zeros_like(context)
        gate_values = None
        dscale, dadd = [], []
        if scale_weights:
            t = transform(scale_weights, context, scale_eps, act)
            gate_values = ACTIVATIONS[gate].forward(t.out)
            dctx, dscale = transform_backward(scale_weights, context, t, ACTIVATIONS[gate].backward(dot, t.out), act)
            dcontext += dctx
        if add_weights:
            t = transform(add_weights, context, add_eps, act)
            dctx, dadd = transform_backward(add_weights, context, t, dy_sum, act)
            dcontext += dctx
        if attn_weight is None:
            g = gate_values if gate_values is not None else torch.ones_like(context)
            dx = ops.channel_gate_apply(dy, g, dcontext / (H * W), None, None, None)
            return dx, context.new_empty((0,)), context.new_empty((0,)), dscale, dadd
        weight, bias = _attention_weights(x, attn_weight, attn_bias)
        dx, dweight = ops.attention_pool_backward(dy, x, gate_values, context, dcontext, weight, bias, lse)
        # sum_p of the logits' gradient is 0 per sample, up to rounding: unless one is NaN, which
        # makes every d weight[c] = sum x * dl NaN or infinite too (and eager's sum NaN).
        if attn_bias is not None:
            dattn_bias = (0 * dweight).sum().reshape(1).to(attn_bias.dtype)
        else:
            dattn_bias = context.new_empty((0,))
        return dx, dweight.reshape(attn_weight.shape).to(attn_weight.dtype), dattn_bias, dscale, dadd


def _backward_fake(dy, x, attn_weight, attn_bias, scale_weights, add_weights, context, lse, scale_eps, add_eps, act,
                   gate, backend):
    dattn = [torch.empty_like(t) if t is not None else context.new_empty((0,)) for t in (attn_weight, attn_bias)]
    return (torch.empty_like(dy), *dattn, [torch.empty_like(w) for w in scale_weights],
            [torch.empty_like(w) for w in add_weights])


gc_backward = define_op(_BACKWARD_SCHEMA, _backward, _backward_fake)


class GC(torch.autograd.Function):
    """GC's autograd: one op call forward, one backward. The transforms' tensors come flattened
    after the attention weights (autograd tracks only direct tensor arguments); config =
    (number of scale tensors, scale_eps, add_eps, act, gate, backend) travels as one argument."""

    @staticmethod
    def forward(ctx, config, x, attn_weight, attn_bias, *weights):
        n_scale = config[0]
        y, context, lse = gc_forward(x, attn_weight, attn_bias, weights[:n_scale], weights[n_scale:], *config[1:])
        ctx.save_for_backward(x, attn_weight, attn_bias, context, lse, *weights)
        ctx.config = config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, attn_weight, attn_bias, context, lse, *weights = ctx.saved_tensors
        n_scale = ctx.config[0]
        dx, dattn_weight, dattn_bias, dscale, dadd = gc_backward(
            same_layout_as(dy, x), x, attn_weight, attn_bias, weights[:n_scale], weights[n_scale:], context, lse,
            *ctx.config[1:])
        return (None, dx, dattn_weight if attn_weight is not None else None,
                dattn_bias if attn_bias is not None else None, *dscale, *dadd)


def gc(x: Tensor, attn_weight: Optional[Tensor], attn_bias: Optional[Tensor], scale_weights: Sequence[Tensor],
       add_weights: Sequence[Tensor], scale_eps: float, add_eps: float, act: str, gate: str, backend: str) -> Tensor:
    """y = x * gate(t_scale(context)) + t_add(context), differentiable in x and every weight."""
    return GC.apply((len(scale_weights), scale_eps, add_eps, act, gate, backend), x, attn_weight, attn_bias,
                    *scale_weights, *add_weights)
