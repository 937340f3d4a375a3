"""Attention pooling in Triton (GC's context modeling), with the signatures of the CUDA primitives
(csrc/attention_pool.cu).

  attention_pool(x, weight, bias) -> (context, lse)                              one read of x
      l[n,p] = sum_c weight[c] x[n,c,p] + bias,  a = softmax_p(l),  context[n,c] = sum_p a[n,p] x[n,c,p]
      lse[n] = logsumexp_p l[n,p] (backward recomputes a from it)
  attention_pool_backward(dy, x, gate, context, dcontext, weight, bias, lse) -> (dx, dweight)
                                                                  one read of dy and x, one write
      dx = dy * gate[n,c] + a * dcontext[n,c] + dl * weight[c],  dweight[c] = sum_n,p dl * x
      with dl[n,p] = a * sum_c dcontext[n,c] (x[n,c,p] - context[n,c]): the backward of
      y = x * gate + t(context) through the pooling (gate None means 1). dl is a * (u - k), u =
      sum_c dcontext x and k = sum_c dcontext context, with the difference taken before the sum:
      where the softmax is peaked, u - k is a small difference of two large sums, which rounded
      apart lost up to half of its bits.

A program holds all C channels of a tile of pixels in registers, so that the logits (a reduction
over C) and the weighted sum (a reduction over H*W) come from one read: a float32 online softmax
(max and sum rescaled as each tile arrives) over the program's share of H*W; the shares' partial
results are combined in a fixed order. weight (C,), bias (1,), lse (N,) and the (N, C) tensors are
in the accumulator dtype (float32; float64 for float64 x).
"""
import torch
import triton
import triton.language as tl

from ..ops.primitives import ATTENTION_POOL_MAX_CHANNELS, acc_dtype
from .channel_gate import check_activation, check_stats, device_guard, nan_max, nan_maximum, split_hw, strides

_TILE_ELEMENTS = 8192  # elements of x a program holds per loop step


def tile_shape(x: torch.Tensor):
    """(BLOCK_C, BLOCK_HW): every channel, and as many pixels as the tile budget allows."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    block_c = triton.next_power_of_2(C)
    return block_c, max(1, min(triton.next_power_of_2(HW), _TILE_ELEMENTS // block_c))


def tile_warps(block_c: int, block_hw: int) -> int:
    """Warps for a program's tile: 16 elements of it per thread, 4 to 16 warps. Compiled for sm_90a
    at ResNet-50's GC shapes (ptxas), 4 warps for the 8192-element tile left the backward spilling
    about 6.5 KB per thread in NCHW at C >= 1024 (and 220 B at C = 256 and 512 in float32) and the
    forward 168 B; with 16 warps only the NCHW backward at C >= 1024 spills (744 to 808 B stored)."""
    return max(4, min(16, block_c * block_hw // 512))


@triton.jit
def _pool_kernel(
    x_ptr, w_ptr, b_ptr, acc_ptr, max_ptr, sum_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, split of H*W): acc[c] = sum_p exp(l_p - m) x[c, p] and s = sum_p
    # exp(l_p - m) over the split, m the split's running max of the logits.
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = acc_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w = tl.load(w_ptr + c, mask=c_mask, other=0)
    bias = tl.load(b_ptr)
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)

    run_max = tl.sum(tl.full((BLOCK_HW,), float("-inf"), dtype=acc_ty), axis=0)  # -inf, a scalar of acc_ty
    run_sum = tl.sum(tl.zeros((BLOCK_HW,), dtype=acc_ty), axis=0)
    acc = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        mask = c_mask[:, None] & hw_mask[None, :]
        tile = tl.load(x_ptr + n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw,
                       mask=mask, other=0).to(acc_ty)
        logits = tl.where(hw_mask, tl.sum(tile * w[:, None], axis=0) + bias, float("-inf"))
        new_max = nan_maximum(run_max, nan_max(logits, 0))  # NaN if a logit is: softmax is NaN then
        # The shift: the max, but 0 while every logit so far is -inf (exp(-inf - -inf) would be NaN
        # where softmax gives those logits weight 0 next to a finite one, or NaN for all if none is).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)  # 0 on the first tile (run_max = -inf)
        e = tl.exp(logits - shift)         # 0 on masked pixels
        run_sum = run_sum * rescale + tl.sum(e, axis=0)
        acc = acc * rescale + tl.sum(tile * e[None, :], axis=1)
        run_max = new_max
    tl.store(acc_ptr + (split * N + n) * C + c, acc, mask=c_mask)
    tl.store(max_ptr + split * N + n, run_max)
    tl.store(sum_ptr + split * N + n, run_sum)


def _check_weights(op, x, weight, bias):
    C = x.shape[1]
    check_stats(op, x, (C,), weight=weight)
    check_stats(op, x, (1,), bias=bias)
    if C > ATTENTION_POOL_MAX_CHANNELS:
        raise ValueError(f"{op}(): argument 'x' has {C} channels; at most {ATTENTION_POOL_MAX_CHANNELS} are supported")


def attention_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    op = "attention_pool"
    check_activation(op, "x", x)
    _check_weights(op, x, weight, bias)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros((N, C), dtype=acc), x.new_zeros((N,), dtype=acc)
    block_c, block_hw = tile_shape(x)
    _, splits, per_split = split_hw(x, block_c, block_hw)
    partial = torch.empty((splits, N, C), dtype=acc, device=x.device)
    part_max = torch.empty((splits, N), dtype=acc, device=x.device)
    part_sum = torch.empty((splits, N), dtype=acc, device=x.device)
    with device_guard(x):
        _pool_kernel[(N, splits)](
            x, weight, bias, partial, part_max, part_sum, N, C, H * W, *strides(x), per_split,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=tile_warps(block_c, block_hw),
        )
    return combine_splits(partial, part_max, part_sum)


def combine_splits(partial, part_max, part_sum):
    """(context, lse) from the splits' (acc, max, sum) of an online softmax, in a fixed order."""
    total_max = part_max.amax(0)
    rescale = torch.exp(part_max - total_max)
    total = (part_sum * rescale).sum(0)
    context = (partial * rescale[:, :, None]).sum(0) / total[:, None]
    return context, total_max + torch.log(total)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, gate_ptr, ctx_ptr, dctx_ptr, w_ptr, b_ptr, lse_ptr, dx_ptr, dw_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    HAS_GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, split of H*W): dx over the split, and its share of d weight.
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = dw_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w = tl.load(w_ptr + c, mask=c_mask, other=0)
    ctx = tl.load(ctx_ptr + n * C + c, mask=c_mask, other=0)
    dctx = tl.load(dctx_ptr + n * C + c, mask=c_mask, other=0)
    if HAS_GATE:
        gate = tl.load(gate_ptr + n * C + c, mask=c_mask, other=0)
    bias = tl.load(b_ptr)
    lse = tl.load(lse_ptr + n)
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)

    dw = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        mask = c_mask[:, None] & hw_mask[None, :]
        offsets = n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
        tile = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
        logits = tl.sum(tile * w[:, None], axis=0) + bias
        a = tl.where(hw_mask, tl.exp(logits - lse), 0.0)
        dl = a * tl.sum((tile - ctx[:, None]) * dctx[:, None], axis=0)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty)
        dx = a[None, :] * dctx[:, None] + dl[None, :] * w[:, None]
        if HAS_GATE:
            dx += dy * gate[:, None]
        else:
            dx += dy
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(tile * dl[None, :], axis=1)
    tl.store(dw_ptr + (split * N + n) * C + c, dw, mask=c_mask)


def attention_pool_backward(dy, x, gate, context, dcontext, weight, bias, lse):
    op = "attention_pool_backward"
    check_activation(op, "x", x)
    check_activation(op, "dy", dy, like=x)
    _check_weights(op, x, weight, bias)
    N, C, H, W = x.shape
    check_stats(op, x, (N, C), gate=gate, context=context, dcontext=dcontext)
    check_stats(op, x, (N,), lse=lse)
    dx = torch.empty_like(dy)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return dx, x.new_zeros((C,), dtype=acc)
    block_c, block_hw = tile_shape(x)
    _, splits, per_split = split_hw(x, block_c, block_hw)
    dw_part = torch.empty((splits, N, C), dtype=acc, device=x.device)
    with device_guard(x):
        _backward_kernel[(N, splits)](
            dy, x, gate if gate is not None else dcontext, context, dcontext, weight, bias, lse, dx, dw_part,
            N, C, H * W, *strides(x), per_split,
            HAS_GATE=gate is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=tile_warps(block_c, block_hw),
        )
    return dx, dw_part.sum((0, 1))
