"""Selective Kernel attention as torch.library ops: the attention of timm's SelectiveKernel over its
P branch outputs, and their weighted sum, the whole contract here.

    s    = mean over H*W of sum_p x_p                          (N, C)
    h    = act(BN(s @ W_reduce^T))                             (N, A), BN over the batch
    attn = softmax over p of (h @ W_select^T).view(N, P, C)    (N, P, C)
    y    = sum_p attn[:, p] * x_p

Forward: channel_pool of each path (reads P|x|) -> the small math -> path_mix (reads P|x|,
    writes |x|): (2P + 1)|x|, where timm's stack, sum, mean, product and sum take about 7P|x|.
Backward: path_grad_reduce (reads dy and the paths: d attn) -> the small math backward ->
    path_grad_apply (reads dy, writes every dx_p = attn_p * dy + d s / HW): (2P + 2)|x|.
Saved for backward: the paths (which the branches' activations keep alive anyway) and O(N*C)
statistics; timm also keeps the stacked copy of the paths.

BatchNorm: in training the op normalizes with the batch statistics and returns them with their
count; the caller updates the running statistics. With bn_group (a process group's name,
attn_kernels.batch_norm) the batch is the whole group's: one all-reduce in forward, one in
backward. In eval it normalizes with the running statistics it is given.
The small math runs in float32 (float64 for float64 paths); the kernels are Triton's.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import batch_norm
from ..activations import ACTIVATIONS
from .channel_gate import same_layout_as
from .excite import linear
from .primitives import acc_dtype, fused_op, primitives


class _Attention:
    """The small math from the pooled vector to the path weights, with what backward needs."""

    def __init__(self, s, fc_reduce_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, fc_select_weight, act, paths):
        self.s = s
        self.h = linear(s, fc_reduce_weight, None)
        self.invstd = torch.rsqrt(bn_var.to(s.dtype) + bn_eps)
        self.normalized = (self.h - bn_mean.to(s.dtype)) * self.invstd
        self.bn_out = self.normalized * bn_weight.to(s.dtype) + bn_bias.to(s.dtype)
        self.hidden = ACTIVATIONS[act].forward(self.bn_out)
        logits = linear(self.hidden, fc_select_weight, None)
        self.attn = torch.softmax(logits.view(s.shape[0], paths, s.shape[1]), dim=1)


def _pooled(paths: List[Tensor]) -> Tensor:
    """mean over H*W of the sum of the paths, (N, C) in the accumulator dtype."""
    return sum(primitives("triton").channel_pool(x, False)[0] for x in paths)


@fused_op("attn_kernels::selective_kernel_forward")
def selective_kernel_forward(
    paths: List[Tensor],
    fc_reduce_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    bn_running_mean: Optional[Tensor],
    bn_running_var: Optional[Tensor],
    bn_training: bool,
    bn_eps: float,
    bn_group: str,
    fc_select_weight: Tensor,
    act: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, s, bn_mean, bn_var, bn_count): the output, the pooled (N, C) vector, and the BN
    statistics the op normalized with (the batch's in training, biased variance) with the number
    of values they were taken over (float64)."""
    s = _pooled(paths)
    if bn_training:
        bn_count, bn_mean, bn_var = batch_norm.batch_moments(linear(s, fc_reduce_weight, None), (0,), bn_group)
    else:
        bn_mean, bn_var = bn_running_mean.to(s.dtype).clone(), bn_running_var.to(s.dtype).clone()
        bn_count = s.new_full((1,), s.shape[0], dtype=torch.float64)
    a = _Attention(s, fc_reduce_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, fc_select_weight, act, len(paths))
    y = primitives("triton").path_mix(paths, a.attn.transpose(0, 1).contiguous())
    return y, s, bn_mean, bn_var, bn_count


@selective_kernel_forward.register_fake
def _(paths, fc_reduce_weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_training, bn_eps,
      bn_group, fc_select_weight, act):
    x = paths[0]
    acc = acc_dtype(x.dtype)
    A = fc_reduce_weight.shape[0]
    return (torch.empty_like(x), x.new_empty(x.shape[:2], dtype=acc), x.new_empty((A,), dtype=acc),
            x.new_empty((A,), dtype=acc), x.new_empty((1,), dtype=torch.float64))


@fused_op("attn_kernels::selective_kernel_backward")
def selective_kernel_backward(
    dy: Tensor,
    paths: List[Tensor],
    fc_reduce_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    fc_select_weight: Tensor,
    s: Tensor,
    bn_mean: Tensor,
    bn_var: Tensor,
    bn_count: Tensor,
    bn_training: bool,
    bn_eps: float,
    bn_group: str,
    act: str,
) -> Tuple[List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Returns (dpaths, d fc_reduce_weight, d bn_weight, d bn_bias, d fc_select_weight)."""
    N, C = s.shape
    P = len(paths)
    a = _Attention(s, fc_reduce_weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, fc_select_weight, act, P)
    dattn = primitives("triton").path_grad_reduce(dy, paths).transpose(0, 1)  # (N, P, C)
    dlogits = (a.attn * (dattn - (a.attn * dattn).sum(1, keepdim=True))).reshape(N, P * C)
    w_select = fc_select_weight.reshape(P * C, -1).to(s.dtype)
    dselect = dlogits.t() @ a.hidden
    dbn_out = ACTIVATIONS[act].backward(dlogits @ w_select, a.bn_out)
    dbn_weight, dbn_bias = (dbn_out * a.normalized).sum(0), dbn_out.sum(0)
    dnormalized = dbn_out * bn_weight.to(s.dtype)
    if bn_training:  # the batch statistics depend on h too
        dh = batch_norm.training_input_grad(dnormalized, a.normalized, a.invstd, (0,), bn_count, bn_group)
    else:
        dh = dnormalized * a.invstd
    w_reduce = fc_reduce_weight.reshape(fc_reduce_weight.shape[0], -1).to(s.dtype)
    dreduce = dh.t() @ s
    bias = (dh @ w_reduce) / (dy.shape[2] * dy.shape[3])
    dpaths = primitives("triton").path_grad_apply(dy, a.attn.transpose(0, 1).contiguous(), bias.contiguous())
    return (
        dpaths,
        dreduce.reshape(fc_reduce_weight.shape).to(fc_reduce_weight.dtype),
        dbn_weight.to(bn_weight.dtype),
        dbn_bias.to(bn_bias.dtype),
        dselect.reshape(fc_select_weight.shape).to(fc_select_weight.dtype),
    )


@selective_kernel_backward.register_fake
def _(dy, paths, fc_reduce_weight, bn_weight, bn_bias, fc_select_weight, s, bn_mean, bn_var, bn_count, bn_training,
      bn_eps, bn_group, act):
    return ([torch.empty_like(dy) for _ in paths], torch.empty_like(fc_reduce_weight), torch.empty_like(bn_weight),
            torch.empty_like(bn_bias), torch.empty_like(fc_select_weight))


def _setup_context(ctx, inputs, output):
    (paths, fc_reduce_weight, bn_weight, bn_bias, _, _, bn_training, bn_eps, bn_group, fc_select_weight, act) = inputs
    _, s, bn_mean, bn_var, bn_count = output
    ctx.mark_non_differentiable(s, bn_mean, bn_var, bn_count)
    ctx.save_for_backward(*paths, fc_reduce_weight, bn_weight, bn_bias, fc_select_weight, s, bn_mean, bn_var, bn_count)
    ctx.paths = len(paths)
    ctx.config = (bn_training, bn_eps, bn_group, act)


def _backward(ctx, dy, *_):
    saved = ctx.saved_tensors
    paths, rest = list(saved[:ctx.paths]), saved[ctx.paths:]
    dpaths, dreduce, dbn_weight, dbn_bias, dselect = selective_kernel_backward(
        same_layout_as(dy, paths[0]), paths, *rest, *ctx.config
    )
    return dpaths, dreduce, dbn_weight, dbn_bias, None, None, None, None, None, dselect, None


selective_kernel_forward.register_autograd(_backward, setup_context=_setup_context)
