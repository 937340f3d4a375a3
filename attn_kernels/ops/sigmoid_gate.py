"""The activation-sized sigmoid gate as torch.library ops: YOLOv4's SAM and Residual Attention, the
whole contract here.

    y = x * (r + sigmoid(logits)),   r = 0 (SAM) or 1 (Residual Attention's (1 + M) * T)

logits come from a conv that cuDNN runs (SAM) or from the mask branch (Residual Attention); the op
fuses the sigmoid, the optional 1 and the product.
- logits of x's shape (point-wise SAM, the attention mask): Triton's sigmoid_gate_apply and
  sigmoid_gate_grad. Forward reads x and logits, writes y (3|x|; eager: 5|x|). Backward reads dy,
  x and logits, writes dx and dlogits (5|x|; eager: 8|x|).
- logits (N, 1, H, W), one gate per pixel (spatial SAM): the spatial-gate primitives of CBAM
  (both backends). Forward 2|x|; backward: spatial_grad_reduce (dy, x) then spatial_gate_apply
  (dy -> dx): 4|x|.
Saved for backward: x and logits (eager saves x and sigmoid(logits)). The math runs in float32
(float64 for float64 x); y, dx and dlogits come in their inputs' dtypes.
"""
from typing import Tuple

import torch
from torch import Tensor

from .channel_gate import same_layout_as
from .primitives import acc_dtype, fused_op, primitives


def is_spatial(x: Tensor, logits: Tensor) -> bool:
    """One gate per pixel, broadcast over x's channels."""
    return logits.shape[1] == 1 and x.shape[1] != 1


def _pixel_gate(x: Tensor, logits: Tensor, residual: bool) -> Tensor:
    """The (N, H*W) gate of the spatial form, in the accumulator dtype."""
    s = torch.sigmoid(logits.reshape(x.shape[0], x.shape[2] * x.shape[3]).to(acc_dtype(x.dtype)))
    return (s + 1 if residual else s).contiguous()


@fused_op("attn_kernels::sigmoid_gate_forward")
def sigmoid_gate_forward(x: Tensor, logits: Tensor, residual: bool, backend: str) -> Tensor:
    if not is_spatial(x, logits):
        return primitives("triton").sigmoid_gate_apply(x, logits, residual)
    sa = _pixel_gate(x, logits, residual)
    return primitives(backend, x.device).spatial_gate_apply(x, None, sa, None, None, None, None, None, None, None)


@sigmoid_gate_forward.register_fake
def _(x, logits, residual, backend):
    return torch.empty_like(x)


@fused_op("attn_kernels::sigmoid_gate_backward")
def sigmoid_gate_backward(dy: Tensor, x: Tensor, logits: Tensor, residual: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (dx, dlogits)."""
    if not is_spatial(x, logits):
        return primitives("triton").sigmoid_gate_grad(dy, x, logits, residual)
    ops = primitives(backend, x.device)
    sa = _pixel_gate(x, logits, residual)
    s = sa - 1 if residual else sa
    dsa, _ = ops.spatial_grad_reduce(dy, x, None, sa)
    dlogits = (dsa * s * (1 - s)).to(logits.dtype).reshape(logits.shape)
    dx = ops.spatial_gate_apply(dy, None, sa, None, None, None, None, None, None, None)
    return dx, dlogits


@sigmoid_gate_backward.register_fake
def _(dy, x, logits, residual, backend):
    return torch.empty_like(dy), torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    x, logits, residual, backend = inputs
    ctx.save_for_backward(x, logits)
    ctx.config = (residual, backend)


def _backward(ctx, dy):
    x, logits = ctx.saved_tensors
    dx, dlogits = sigmoid_gate_backward(same_layout_as(dy, x), x, logits, *ctx.config)
    return dx, dlogits, None, None


sigmoid_gate_forward.register_autograd(_backward, setup_context=_setup_context)
