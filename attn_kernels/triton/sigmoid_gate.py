"""The activation-sized sigmoid gate in Triton (YOLOv4's point-wise SAM, Residual Attention):

  sigmoid_gate_apply(x, logits, residual) -> y            reads x and logits, writes y:
      y = x * (residual + sigmoid(logits))
  sigmoid_gate_grad(dy, x, logits, residual) -> (dx, dlogits)   reads dy, x, logits, writes both:
      dx = dy * (residual + s),  dlogits = dy * x * s * (1 - s),  s = sigmoid(logits)

x, logits and dy have one shape, dtype and memory layout (contiguous NCHW or channels_last), so the
kernels walk them as flat arrays. The math runs in float32 (float64 for float64 inputs). The gate
of one channel per pixel (logits (N, 1, H, W)) reuses the spatial-gate primitives instead.
"""
import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from .channel_gate import check_activation, device_guard, tile_warps

_BLOCK = 1024


@triton.jit
def _sigmoid_gate_kernel(
    x_ptr, logits_ptr, dy_ptr, out_ptr, dlogits_ptr, numel, residual,
    GRAD: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    acc_ty = tl.float64 if F64 else tl.float32
    x = tl.load(x_ptr + i, mask=mask, other=0).to(acc_ty)
    s = 1.0 / (1.0 + tl.exp(-tl.load(logits_ptr + i, mask=mask, other=0).to(acc_ty)))
    if GRAD:
        dy = tl.load(dy_ptr + i, mask=mask, other=0).to(acc_ty)
        tl.store(out_ptr + i, (dy * (residual + s)).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dlogits_ptr + i, (dy * x * (s * (1.0 - s))).to(dlogits_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + i, (x * (residual + s)).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, logits, dy, out, dlogits, residual: bool, grad: bool):
    numel = x.numel()
    if numel:
        with device_guard(x):
            _sigmoid_gate_kernel[(triton.cdiv(numel, _BLOCK),)](
                x, logits, dy, out, dlogits, numel, 1.0 if residual else 0.0,
                GRAD=grad, F64=acc_dtype(x.dtype) == torch.float64, BLOCK=_BLOCK,
                num_warps=tile_warps(_BLOCK, x.dtype),
            )


def sigmoid_gate_apply(x: torch.Tensor, logits: torch.Tensor, residual: bool) -> torch.Tensor:
    op = "sigmoid_gate_apply"
    check_activation(op, "x", x)
    check_activation(op, "logits", logits, like=x)
    out = torch.empty_like(x)
    _launch(x, logits, x, out, out, residual, grad=False)
    return out


def sigmoid_gate_grad(dy: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, residual: bool):
    op = "sigmoid_gate_grad"
    check_activation(op, "x", x)
    check_activation(op, "logits", logits, like=x)
    check_activation(op, "dy", dy, like=x)
    dx, dlogits = torch.empty_like(x), torch.empty_like(logits)
    _launch(x, logits, dy, dx, dlogits, residual, grad=True)
    return dx, dlogits
