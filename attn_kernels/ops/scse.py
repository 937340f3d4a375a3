"""Concurrent spatial and channel squeeze-and-excitation (scSE, Roy et al. 2018): the whole
contract of scSE here, one op call per direction (`scse_forward`, `scse_backward`, defined with
torch.library and wrapped by the autograd function `SCSE`).

    gc = sigmoid(fc2(relu(fc1(mean_hw(x)))))        cSE: one gate per (n, c)
    gs = sigmoid(w . x[n, :, p] + b)                 sSE: one gate per pixel (a 1x1 conv to 1 channel)
    y  = x * gc + x * gs = x * (gc[n, c] + gs[n, p])

Forward:  a reduction (reads x once: the per-channel sums of the mean and the per-pixel logits
          together) -> the (N, C) MLP and the (N, H*W) sigmoid -> the apply (reads x, writes y): 3|x|.
Backward: a reduction of dy and x (sum_p dy*x for gc, sum_c dy*x for gs) -> both gates' small
          backward -> the apply (reads dy and x, writes dx, and sums d w from the same read of x): 5|x|.
Triton (triton/scse.py): the small math inside the kernels, 2 launches forward and 3 backward.
cuda (csrc/scse.cu): the small math in torch ops between the kernels.
Eager PyTorch (segmentation_models_pytorch's SCSEModule) moves 9|x| forward and 24|x| backward
(the ledger's count at 256x56x56; the fused op: 3.1|x| and 5.3|x|). Saved for backward: x, the
(N, C) mean and the (N, H*W) logits (eager: x, both gates, the ReLU's output). The math runs in float32 (float64
for float64 x); y and dx come in x's dtype.
"""
from typing import Optional

import torch
from torch import Tensor

from .channel_gate import same_layout_as
from .excite import excite, excite_backward
from .primitives import acc_dtype, define_op, primitives

_FORWARD_SCHEMA = (
    "scse_forward(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
    "Tensor sse_weight, Tensor? sse_bias, str backend) -> (Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "scse_backward(Tensor dy, Tensor x, Tensor mean, Tensor logits, Tensor fc1_weight, Tensor? fc1_bias, "
    "Tensor fc2_weight, Tensor? fc2_bias, Tensor sse_weight, Tensor? sse_bias, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _spatial_weights(x: Tensor, sse_weight: Tensor) -> Tensor:
    """sSE's (1, C, 1, 1) conv weight as the CUDA kernels take it: (C,), in the accumulator dtype."""
    return sse_weight.reshape(-1).to(acc_dtype(x.dtype)).contiguous()


def _gates(mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """(the cSE excitation, gs (N, H*W)) from the pooled mean and the spatial logits."""
    e = excite("mlp", "avg", mean, None, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "relu", "sigmoid")
    return e, torch.sigmoid(logits)


def _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    """(y, mean (N, C), logits (N, H*W)), the last two in the accumulator dtype."""
    if backend == "triton":
        from .. import triton as kernels

        planes, mean, logits = kernels.scse_pool_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight,
                                                        sse_bias)
        return kernels.scse_apply(x, planes)[0], mean, logits
    ops = primitives(backend, x.device)
    with torch.autocast(x.device.type, enabled=False):  # the small math picks its dtypes by hand
        HW = x.shape[2] * x.shape[3]
        channel_sum, logits = ops.scse_reduce(x, None, _spatial_weights(x, sse_weight))
        mean = channel_sum / HW
        if sse_bias is not None:
            logits = logits + sse_bias.to(logits.dtype)
        e, gs = _gates(mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        y, _ = ops.scse_apply(x, e.gate.contiguous(), gs, None, None, None, None)
    return y, mean, logits


def _forward_fake(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    acc = acc_dtype(x.dtype)
    N, C, H, W = x.shape
    return torch.empty_like(x), x.new_empty((N, C), dtype=acc), x.new_empty((N, H * W), dtype=acc)


scse_forward = define_op(_FORWARD_SCHEMA, _forward, _forward_fake)


def _backward(dy, x, mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    """(dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias, d sse_weight, d sse_bias); absent
    biases get empty (0,) gradients (the autograd function drops them)."""
    weights = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if backend == "triton":
        from .. import triton as kernels

        planes, dweights = kernels.scse_grad_excite(dy, x, mean, logits, *weights)
        dx, dws, dbs = kernels.scse_apply(dy, planes, x, sse_weight, sse_bias)
    else:
        ops = primitives(backend, x.device)
        with torch.autocast(x.device.type, enabled=False):
            HW = x.shape[2] * x.shape[3]
            e, gs = _gates(mean, logits, *weights)
            dgc, dgs = ops.scse_reduce(dy, x, None)
            dmean, _, *dweights = excite_backward("mlp", "avg", e, dgc, *weights, "relu", "sigmoid")
            dlogits = dgs * (gs * (1 - gs))
            weight = _spatial_weights(x, sse_weight)
            dx, dws = ops.scse_apply(dy, e.gate.contiguous(), gs, x, (dmean / HW).contiguous(), dlogits, weight)
            dws = dws.reshape(sse_weight.shape).to(sse_weight.dtype)
            dbs = dlogits.sum().reshape(1).to(sse_bias.dtype) if sse_bias is not None else None
    return (dx, *(d if w is not None else mean.new_empty((0,)) for d, w in zip(dweights, weights)), dws,
            dbs if sse_bias is not None else mean.new_empty((0,)))


def _backward_fake(dy, x, mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    return (torch.empty_like(dy), *(torch.empty_like(w) if w is not None else mean.new_empty((0,))
                                    for w in (fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias)))


scse_backward = define_op(_BACKWARD_SCHEMA, _backward, _backward_fake)


class SCSE(torch.autograd.Function):
    """scSE's autograd: one op call forward, one backward."""

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
        y, mean, logits = scse_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend)
        ctx.save_for_backward(x, mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean, logits, *weights = ctx.saved_tensors
        dx, *dweights = scse_backward(same_layout_as(dy, x), x, mean, logits, *weights, ctx.backend)
        return (dx, *(d if w is not None else None for d, w in zip(dweights, weights)), None)


def scse(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
         sse_weight: Tensor, sse_bias: Optional[Tensor], backend: str) -> Tensor:
    """y = x * cSE(x) + x * sSE(x), differentiable in x and every weight."""
    return SCSE.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend)
