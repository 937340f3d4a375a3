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
Both kernel backends, Triton (triton/scse.py) and cuda (csrc/scse.cu), keep the small math inside
the kernels: the last block (program) of each sample folds its partials and runs cSE's MLP or its
backward, so no torch op runs between the launches: 2 launches forward, 3 backward.
Eager PyTorch (segmentation_models_pytorch's SCSEModule) moves 9|x| forward and 24|x| backward
(the ledger's count at 256x56x56; the fused op: 3.1|x| and 5.3|x|). Saved for backward: x, the
(N, C) mean and the (N, H*W) logits (eager: x, both gates, the ReLU's output). The math runs in float32 (float64
for float64 x); y and dx come in x's dtype.
"""
from typing import Optional

import torch
from torch import Tensor

from .channel_gate import same_layout_as
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


def _forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, backend):
    """(y, mean (N, C), logits (N, H*W)), the last two in the accumulator dtype."""
    if backend == "triton":
        from .. import triton as kernels

        planes, mean, logits = kernels.scse_pool_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight,
                                                        sse_bias)
        return kernels.scse_apply(x, planes)[0], mean, logits
    ops = primitives(backend, x.device)
    gate, mean, logits = ops.scse_pool_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias)
    return ops.scse_apply(x, gate, logits, None, None, None, None, None, None)[0], mean, logits


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
        gate, cbias, dlogits, dlogit_sums, *dweights = ops.scse_grad_excite(dy, x, mean, logits, *weights)
        dx, dws, dbs = ops.scse_apply(dy, gate, logits, x, cbias, dlogits, dlogit_sums, sse_weight, sse_bias)
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
