"""Modulated deformable convolution (DCNv2; DCNv1 without mask) as torch.library ops, the whole
contract here:

    out[n, o, p] = bias[o] + sum_{c, k} weight[o, c, k] * mask[n, d*K + k, p] * bilinear(x[n, c], s)
    s = (the position of tap k at output pixel p) + offset[n, 2*(d*K + k) : 2*(d*K + k) + 2, p]

with torchvision.ops.deform_conv2d's semantics, argument layout and gradients (d: the offset group
of channel c; offsets are (dy, dx) pairs per tap; mask None = all ones). Triton kernels only
(attn_kernels/triton/deform_conv.py, whose docstring gives the kernels, the sampling rules and the
determinism). The math runs in float32 (float64 for float64 x); outputs and gradients come in
their inputs' dtypes.

DRAM traffic per image, b bytes an element, columns = C*K*P elements (K = kh*kw taps, P =
Hout*Wout), out = O*P, |x| = C*H*W, |offset| + |mask| = 3*D*K*P:
- torchvision (im2col): forward writes the columns and reads them back for the GEMM (2 columns,
  plus x's gathers and the offsets); backward writes the columns gradient by a GEMM, reads it twice
  (offset/mask gradients, then dx by atomics) and rebuilds the columns for dweight (write + read):
  about 5 columns. At ResNet-50's 3x3 sites (K = 9, P ~ H*W) a columns buffer is 9|x|, so forward
  moves ~20|x| and backward ~45|x|, plus one columns-sized allocation.
- fused: forward reads x's samples (4 corners per (c, k, p): from L2/L1 at conv-like locality,
  ~|x| to a few |x| from DRAM), offset and mask once per weight-group and output-channel tile,
  writes out. Backward: the input-gradients kernel reads dy (once per offset group and tap; L2
  holds a tile's dy across taps), x's samples, offset and mask, writes doffset and dmask once and
  dx by atomics (read-modify-write in L2); the weight-gradient kernel re-samples x and reads dy
  again; partial dweight sums are O*C/G*K per split. So ~2-4|x| + |out| forward and ~6-10|x| +
  3|out| backward, no columns-sized buffer at all (deterministic dx: plus a sort of 4*D*K*P
  (key, index) pairs and ~4x the dcol FLOPs, see the kernel file).
Saved for backward: the inputs x, weight, offset and mask only, and whether there is a bias (torchvision
also saves bias).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .primitives import fused_op, primitives


@fused_op("attn_kernels::deform_conv2d_forward")
def deform_conv2d_forward(x: Tensor, weight: Tensor, offset: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
                          stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    return primitives("triton").deform_conv2d(x, weight, offset, mask, bias, stride, padding, dilation)


@deform_conv2d_forward.register_fake
def _(x, weight, offset, mask, bias, stride, padding, dilation):
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    shape = (x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    return x.new_empty(shape).contiguous(memory_format=fmt)


@fused_op("attn_kernels::deform_conv2d_backward")
def deform_conv2d_backward(dy: Tensor, x: Tensor, weight: Tensor, offset: Tensor, mask: Optional[Tensor],
                           has_bias: bool, stride: List[int], padding: List[int],
                           dilation: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, doffset, dmask, dbias); dmask and dbias have no elements where there is no
    mask or no bias (an op returns tensors)."""
    dx, dweight, doffset, dmask, dbias = primitives("triton").deform_conv2d_backward(
        dy, x, weight, offset, mask, has_bias, stride, padding, dilation)
    return dx, dweight, doffset, dmask if dmask is not None else x.new_empty(0), \
        dbias if dbias is not None else x.new_empty(0)


@deform_conv2d_backward.register_fake
def _(dy, x, weight, offset, mask, has_bias, stride, padding, dilation):
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return (torch.empty_like(x, memory_format=fmt), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(offset, memory_format=torch.contiguous_format),
            torch.empty_like(mask, memory_format=torch.contiguous_format) if mask is not None else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if has_bias else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, offset, mask, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, offset, mask)
    ctx.config = (bias is not None, stride, padding, dilation)


def _backward(ctx, dy):
    x, weight, offset, mask = ctx.saved_tensors
    has_bias = ctx.config[0]
    dx, dweight, doffset, dmask, dbias = deform_conv2d_backward(dy, x, weight, offset, mask, *ctx.config)
    return dx, dweight, doffset, dmask if mask is not None else None, dbias if has_bias else None, None, None, None


deform_conv2d_forward.register_autograd(_backward, setup_context=_setup_context)
