"""CBAM as torch.library ops: channel then spatial attention in one pass structure, the whole
contract here. Without the channel MLP (fc1_weight None) it is CBAM's spatial attention alone.

    ca = gate(MLP(mean_hw x) + MLP(max_hw x))                   per (n, c); ops/excite.py, pool 'avg+max'
                                                                 (or 'avg', 'max': the official code's pool_types)
    u  = x * ca                                                  never written to memory
    sa = gate(BN(conv_kxk([mean_c u, max_c u])))                 per (n, h, w)
    y  = u * sa

Forward (4|x|): channel_pool (x) -> MLP -> spatial_pool (x) -> conv, BN, gate ->
    spatial_gate_apply (x -> y).
Backward (6|x|): spatial_grad_reduce (dy, x: d sa and the direct part of d ca) -> gate, BN and
    conv backward -> spatial_pool_grad_reduce (x: the pooling part of d ca, channel ties) -> MLP
    backward -> spatial_gate_apply (dy, x -> dx).
Saved for backward: x and O(N*C + N*H*W) statistics. Max pooling gradients are shared equally
by tied maxima, as torch.amax's.

BatchNorm: in training the op normalizes with the batch statistics and returns them with their
count; the caller updates the running statistics (the op mutates nothing). With bn_group (a
process group's name, attn_kernels.batch_norm) the batch is the whole group's: one all-reduce in
forward, one in backward. In eval it normalizes with the running statistics it is given. The
small spatial math runs in float32 (float64 for float64 x).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import batch_norm
from ..activations import ACTIVATIONS
from .channel_gate import nan_where_max_is_nan, same_layout_as
from .excite import excite, excite_backward
from .primitives import acc_dtype, fused_op, primitives


def _conv_maps(smean, smax, shape, conv_weight):
    """(maps, z): the pooled maps [mean_c u, max_c u] as (N, 2, H, W) and their k x k conv."""
    N, _, H, W = shape
    maps = torch.stack((smean, smax), 1).reshape(N, 2, H, W)
    k = conv_weight.shape[-1]
    return maps, torch.nn.functional.conv2d(maps, conv_weight.to(maps.dtype), padding=k // 2)


def _batch_norm(z, mean, var, weight, bias, eps):
    """(invstd, normalized, output) of the one-channel BN with the statistics given."""
    invstd = torch.rsqrt(var.to(z.dtype) + eps)
    normalized = (z - mean.to(z.dtype)) * invstd
    return invstd, normalized, normalized * weight.to(z.dtype) + bias.to(z.dtype)


@fused_op("attn_kernels::cbam_forward")
def cbam_forward(
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor],
    conv_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    bn_running_mean: Tensor,
    bn_running_var: Tensor,
    bn_training: bool,
    bn_eps: float,
    bn_group: str,
    pool: str,
    act: str,
    gate: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, cmean, cmax, smean, smax, sties, bn_mean, bn_var, bn_count): the output, the
    channel statistics (empty without the MLP), the spatial statistics (N, H*W), and the BN
    statistics the op normalized with (the batch's in training, biased variance) with the number
    of values they were taken over (float64)."""
    ops = primitives(backend, x.device)
    acc = acc_dtype(x.dtype)
    if fc1_weight is not None:
        cmean, cmax = ops.channel_pool(x, True)
        ca = excite("mlp", pool, cmean, cmax, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate).gate
    else:
        cmean, cmax = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
        ca = None
    smean, smax, sties = ops.spatial_pool(x, ca)
    z = _conv_maps(smean, smax, x.shape, conv_weight)[1]
    if bn_training:
        bn_count, bn_mean, bn_var = batch_norm.batch_moments(z, (0, 1, 2, 3), bn_group)
        bn_mean, bn_var = bn_mean.reshape(1), bn_var.reshape(1)
    else:
        bn_mean, bn_var = bn_running_mean.to(acc).clone(), bn_running_var.to(acc).clone()
        bn_count = z.new_full((1,), z.numel(), dtype=torch.float64)
    logits = _batch_norm(z, bn_mean, bn_var, bn_weight, bn_bias, bn_eps)[2]
    sa = ACTIVATIONS[gate].forward(logits).reshape(x.shape[0], x.shape[2] * x.shape[3])  # N may be 0
    y = ops.spatial_gate_apply(x, ca, sa, None, None, None, None, None, None, None)
    return y, cmean, cmax, smean, smax, sties, bn_mean, bn_var, bn_count


@cbam_forward.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias, bn_running_mean,
      bn_running_var, bn_training, bn_eps, bn_group, pool, act, gate, backend):
    acc = acc_dtype(x.dtype)
    N, C, H, W = x.shape
    channel = (N, C) if fc1_weight is not None else (0,)
    return (
        torch.empty_like(x),
        x.new_empty(channel, dtype=acc),
        x.new_empty(channel, dtype=acc),
        *(x.new_empty((N, H * W), dtype=acc) for _ in range(3)),
        x.new_empty((1,), dtype=acc),
        x.new_empty((1,), dtype=acc),
        x.new_empty((1,), dtype=torch.float64),
    )


@fused_op("attn_kernels::cbam_backward")
def cbam_backward(
    dy: Tensor,
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor],
    conv_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    cmean: Tensor,
    cmax: Tensor,
    smean: Tensor,
    smax: Tensor,
    sties: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_count: Tensor,
    bn_training: bool,
    bn_eps: float,
    bn_group: str,
    pool: str,
    act: str,
    gate: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias, d conv_weight, d bn_weight,
    d bn_bias); MLP gradients are empty without the MLP, bias gradients present even for absent
    biases (the autograd formula drops them)."""
    ops = primitives(backend, x.device)
    N, C, H, W = x.shape
    channel = fc1_weight is not None
    mlp_weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    e = excite("mlp", pool, cmean, cmax, *mlp_weights, act, gate) if channel else None
    ca = e.gate if channel else None
    maps, z = _conv_maps(smean, smax, x.shape, conv_weight)
    invstd, normalized, logits = _batch_norm(z, bn_mean, bn_var, bn_weight, bn_bias, bn_eps)
    sa = ACTIVATIONS[gate].forward(logits).reshape(N, H * W)

    # Pass 1: d sa, and the part of d ca that flows straight from y = u * sa.
    dsa, dca = ops.spatial_grad_reduce(dy, x, ca, sa)
    dlogits = ACTIVATIONS[gate].backward(dsa.reshape(logits.shape), logits)
    dbn_bias = dlogits.sum().reshape(1)
    dbn_weight = (dlogits * normalized).sum().reshape(1)
    dnormalized = dlogits * bn_weight.to(dlogits.dtype)
    if bn_training:  # the batch statistics depend on z too
        dz = batch_norm.training_input_grad(dnormalized, normalized, invstd, (0, 1, 2, 3), bn_count, bn_group)
    else:
        dz = dnormalized * invstd
    k = conv_weight.shape[-1]
    dmaps, dconv_weight, _ = torch.ops.aten.convolution_backward(
        dz, maps, conv_weight.to(maps.dtype), None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )
    # mean_c spreads its gradient over C channels; max_c over the tied maxima.
    pmean = nan_where_max_is_nan((dmaps[:, 0] / C).reshape(N, H * W), smax).contiguous()
    pmax = (dmaps[:, 1].reshape(N, H * W) / sties).contiguous()

    if channel:
        # Pass 2: the part of d ca that flows through the spatial pooling of u, and the channel ties.
        dca_pool, cties = ops.spatial_pool_grad_reduce(x, ca, smax, pmean, pmax, cmax)
        dcmean, dcmax, *dmlp = excite_backward("mlp", pool, e, dca + dca_pool, *mlp_weights, act, gate)
        # Pass 3. A pool without the mean (or the max) contributes no term of its own.
        cbias = dcmean / (H * W) if dcmean is not None else torch.zeros_like(cties)
        if dcmax is not None:
            cbias, ctie = nan_where_max_is_nan(cbias, cmax), dcmax / cties
        else:
            ctie = torch.zeros_like(cties)
        dx = ops.spatial_gate_apply(dy, ca, sa, x, smax, pmean, pmax, cbias, cmax, ctie)
    else:
        dmlp = [x.new_empty((0,), dtype=cmean.dtype) for _ in range(4)]
        dx = ops.spatial_gate_apply(dy, None, sa, x, smax, pmean, pmax, None, None, None)
    return (
        dx,
        *dmlp,
        dconv_weight.to(conv_weight.dtype),
        dbn_weight.to(bn_weight.dtype),
        dbn_bias.to(bn_bias.dtype),
    )


@cbam_backward.register_fake
def _(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias, cmean, cmax,
      smean, smax, sties, bn_mean, bn_var, bn_count, bn_training, bn_eps, bn_group, pool, act, gate, backend):
    if fc1_weight is not None:
        dmlp = (
            torch.empty_like(fc1_weight),
            fc1_weight.new_empty(fc1_weight.shape[:1], dtype=fc1_bias.dtype if fc1_bias is not None else None),
            torch.empty_like(fc2_weight),
            fc2_weight.new_empty(fc2_weight.shape[:1], dtype=fc2_bias.dtype if fc2_bias is not None else None),
        )
    else:
        dmlp = tuple(x.new_empty((0,), dtype=cmean.dtype) for _ in range(4))
    return (torch.empty_like(dy), *dmlp, torch.empty_like(conv_weight), torch.empty_like(bn_weight),
            torch.empty_like(bn_bias))


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias, _, _,
     bn_training, bn_eps, bn_group, pool, act, gate, backend) = inputs
    _, cmean, cmax, smean, smax, sties, bn_mean, bn_var, bn_count = output
    ctx.mark_non_differentiable(cmean, cmax, smean, smax, sties, bn_mean, bn_var, bn_count)
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias,
                          cmean, cmax, smean, smax, sties, bn_mean, bn_var, bn_count)
    ctx.config = (bn_training, bn_eps, bn_group, pool, act, gate, backend)


def _backward(ctx, dy, *_):
    saved = ctx.saved_tensors
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = saved[:5]
    dx, dw1, db1, dw2, db2, dconv, dbn_weight, dbn_bias = cbam_backward(same_layout_as(dy, x), *saved, *ctx.config)
    channel = fc1_weight is not None
    return (
        dx,
        dw1 if channel else None,
        db1 if fc1_bias is not None else None,
        dw2 if channel else None,
        db2 if fc2_bias is not None else None,
        dconv,
        dbn_weight,
        dbn_bias,
        None, None, None, None, None, None, None, None, None,
    )


cbam_forward.register_autograd(_backward, setup_context=_setup_context)
