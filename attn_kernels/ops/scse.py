"""Concurrent spatial and channel squeeze-and-excitation (scSE, Roy et al. 2018) as torch.library
ops: the whole contract of scSE here.

    gc = sigmoid(fc2(relu(fc1(mean_hw(x)))))        cSE: one gate per (n, c)
    gs = sigmoid(w . x[n, :, p] + b)                 sSE: one gate per pixel (a 1x1 conv to 1 channel)
    y  = x * gc + x * gs = x * (gc[n, c] + gs[n, p])

Forward:  scse_reduce (reads x once: the per-channel sums of the mean and the per-pixel logits
          together) -> the (N, C) MLP and the (N, H*W) sigmoid -> scse_apply (reads x, writes y): 3|x|.
Backward: scse_reduce(dy, x) (reads dy and x: sum_p dy*x for gc, sum_c dy*x for gs) -> both
          gates' small backward -> scse_apply (reads dy and x, writes dx, and sums d w from the same
          read of x): 5|x|.
Eager PyTorch (segmentation_models_pytorch's SCSEModule) moves 9|x| forward and 24|x| backward
(the ledger's count at 256x56x56; the fused op: 3.1|x| and 5.3|x|). Saved for backward: x, the
(N, C) mean and the (N, H*W) logits (eager: x, both gates, the ReLU's output). The math runs in float32 (float64
for float64 x); y and dx come in x's dtype.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .channel_gate import same_layout_as
from .excite import excite, excite_backward
from .primitives import acc_dtype, fused_op, primitives


def _spatial_weights(x: Tensor, sse_weight: Tensor) -> Tensor:
    """sSE's (1, C, 1, 1) conv weight as the kernels take it: (C,), in the accumulator dtype."""
    return sse_weight.reshape(-1).to(acc_dtype(x.dtype)).contiguous()


def _gates(mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """(the cSE excitation, gs (N, H*W)) from the pooled mean and the spatial logits."""
    e = excite("mlp", "avg", mean, None, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "relu", "sigmoid")
    return e, torch.sigmoid(logits)


@fused_op("attn_kernels::scse_forward")
def scse_forward(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    sse_weight: Tensor,
    sse_bias: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (y, mean (N, C), logits (N, H*W)), the last two in the accumulator dtype."""
    ops = primitives(backend, x.device)
    HW = x.shape[2] * x.shape[3]
    channel_sum, logits = ops.scse_reduce(x, None, _spatial_weights(x, sse_weight))
    mean = channel_sum / HW
    if sse_bias is not None:
        logits = logits + sse_bias.to(logits.dtype)
    e, gs = _gates(mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    y, _ = ops.scse_apply(x, e.gate.contiguous(), gs, None, None, None, None)
    return y, mean, logits


@scse_forward.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    acc = acc_dtype(x.dtype)
    N, C, H, W = x.shape
    return torch.empty_like(x), x.new_empty((N, C), dtype=acc), x.new_empty((N, H * W), dtype=acc)


@fused_op("attn_kernels::scse_backward")
def scse_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    logits: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    sse_weight: Tensor,
    sse_bias: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias, d sse_weight, d sse_bias);
    bias gradients also for absent biases (the autograd formula drops them)."""
    ops = primitives(backend, x.device)
    HW = x.shape[2] * x.shape[3]
    e, gs = _gates(mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    dgc, dgs = ops.scse_reduce(dy, x, None)
    dmean, _, dw1, db1, dw2, db2 = excite_backward(
        "mlp", "avg", e, dgc, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "relu", "sigmoid")
    dlogits = dgs * (gs * (1 - gs))
    weight = _spatial_weights(x, sse_weight)
    dx, dweight = ops.scse_apply(dy, e.gate.contiguous(), gs, x, (dmean / HW).contiguous(), dlogits, weight)
    bias_dtype = (sse_bias if sse_bias is not None else sse_weight).dtype
    return (dx, dw1, db1, dw2, db2, dweight.reshape(sse_weight.shape).to(sse_weight.dtype),
            dlogits.sum().reshape(1).to(bias_dtype))


@scse_backward.register_fake
def _(dy, x, mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    def bias_like(bias, weight):
        return weight.new_empty(weight.shape[:1], dtype=(bias if bias is not None else weight).dtype)

    return (torch.empty_like(dy), torch.empty_like(fc1_weight), bias_like(fc1_bias, fc1_weight),
            torch.empty_like(fc2_weight), bias_like(fc2_bias, fc2_weight), torch.empty_like(sse_weight),
            sse_weight.new_empty((1,), dtype=(sse_bias if sse_bias is not None else sse_weight).dtype))


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend = inputs
    _, mean, logits = output
    ctx.mark_non_differentiable(mean, logits)
    ctx.save_for_backward(x, mean, logits, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias)
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None, sse_bias is not None)
    ctx.backend = backend


def _backward(ctx, dy, _dmean, _dlogits):
    x, *saved = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dws, dbs = scse_backward(same_layout_as(dy, x), x, *saved, ctx.backend)
    has_b1, has_b2, has_bs = ctx.has_bias
    return (dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None, dws, dbs if has_bs else None, None)


scse_forward.register_autograd(_backward, setup_context=_setup_context)
