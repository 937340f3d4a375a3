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

A program owns one image's share of H*W (a split) and walks it a tile of pixels at a time, every
tile in two passes over the channels, a chunk of them per step (tile_shape; a step's BLOCK_C x
BLOCK_HW elements fit in registers at every C, which a tile of all C channels did not: it spilled).
Pass 1 reads the tile's x to form the logits (a reduction over C), pass 2 reads it again with dy
and writes dx, or in the forward adds the tile's exp-weighted x to the context: the second read is
of the tile's x just read (C x BLOCK_HW elements, at most 64 KB at ResNet-50's shapes), from L1 or
L2, not DRAM. The forward is a float32 online softmax (max and sum rescaled as each tile arrives)
over the split; the splits' partial results are combined in a fixed order. Per-channel sums over
the split (the forward's weighted sum, the backward's dweight) live in the program's own row of an
(splits, N, C) buffer, which the first tile stores and each later one loads and adds to: every sum
has a fixed order, no atomics, bitwise reproducible. weight (C,), bias (1,), lse (N,) and the
(N, C) tensors are in the accumulator dtype (float32; float64 for float64 x).

The tile comes from the shape (tile_shape, program_warps), not from triton.autotune: BLOCK_HW sets
the grid and the partials' shape, which autotune cannot vary, and a timed pick of BLOCK_C or the
warps would change the order of the sums from one process to the next.
"""
import torch
import triton
import triton.language as tl

from ..ops.primitives import ATTENTION_POOL_MAX_CHANNELS, acc_dtype
from .channel_gate import (
    check_activation, check_stats, device_guard, nan_max, nan_maximum, split_hw, strides, tile_warps,
)

_TILE_ELEMENTS = 2048  # float32 elements of x a program holds per step (half as many float64)
_ROW_BYTES = 128  # in NCHW, the bytes of each channel's pixels in a tile: a cache line where H*W allows


def tile_shape(x: torch.Tensor):
    """(BLOCK_C, BLOCK_HW): a program's step takes BLOCK_C channels of BLOCK_HW pixels. BLOCK_HW
    is the widest that splits H*W as finely as 8 pixels would (split_hw: as many programs as fill
    the GPU, where H*W allows): in NCHW from a cache line of each channel's contiguous pixels down
    to 8 (16 B in bfloat16: neighbouring splits share sectors, read at the same time from L2); in
    channels_last from 8 pixels, or more where C is small. BLOCK_C fills the tile."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    tile = _TILE_ELEMENTS * 4 // acc_dtype(x.dtype).itemsize
    c_pow2, hw_pow2 = triton.next_power_of_2(C), triton.next_power_of_2(HW)
    if x.is_contiguous():
        widest = min(hw_pow2, max(1, _ROW_BYTES // x.element_size()))
    else:
        widest = min(hw_pow2, max(8, tile // c_pow2))
    narrowest = min(widest, 8)
    finest_splits = split_hw(x, C, narrowest)[1]
    block_hw = widest
    while block_hw > narrowest and split_hw(x, C, block_hw)[1] < finest_splits:
        block_hw //= 2
    return min(c_pow2, max(1, tile // block_hw)), block_hw


def program_warps(block_c: int, block_hw: int, dtype: torch.dtype) -> int:
    """channel_gate's tile_warps for a step's tile, counted twice: pass 1 keeps tile-shaped
    products (the logits', and u - k's in the backward) beside the chunk of x. 8 warps at every
    ResNet-50 GC shape (256x56x56, 512x28x28, 1024x14x14, 2048x7x7). Compiled for sm_90a (ptxas)
    there with N = 1 to 256, in bfloat16 and float32, NCHW and channels_last: no spills; the forward
    32 to 55 registers, the backward 48 to 80, and 80 to 125 in NCHW at 14x14 and 7x7 (H*W not a
    multiple of 16: no vector loads, every element its own address). Two programs fit an SM at
    every shape (float64 too: at most 80 registers). The tile of all C channels this replaced (8192
    elements, 16 warps) spilled up to 808 B per thread in the NCHW backward at C >= 1024, and left
    one program per SM in most of the backward."""
    return tile_warps(2 * block_c * block_hw, dtype)


@triton.jit
def pool_split(x_image, w_ptr, bias, acc_row, C, hw_begin, hw_end, stride_c, stride_hw, w_stride,
               BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """One program's split [hw_begin, hw_end) of an image: acc[c] = sum_p exp(l_p - m) x[c, p]
    into acc_row, and (m, s = sum_p exp(l_p - m)), m the split's max of the logits. The weight is
    read in its own dtype (at w_stride), the math in acc_row's."""
    acc_ty = acc_row.dtype.element_ty
    run_max = tl.sum(tl.full((BLOCK_HW,), float("-inf"), dtype=acc_ty), axis=0)  # -inf, a scalar of acc_ty
    run_sum = tl.sum(tl.zeros((BLOCK_HW,), dtype=acc_ty), axis=0)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        # Pass 1: the tile's logits. The products are summed over the chunks where they lie, and
        # over the channels once at the end: no step reduces across threads.
        logit_terms = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
        for c_start in range(0, C, BLOCK_C):
            # int64: c * stride_c passes 2^31 in an NCHW image of more than 2^31 elements
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            w = tl.load(w_ptr + c * w_stride, mask=c_mask, other=0).to(acc_ty)
            tile = tl.load(x_image + c[:, None] * stride_c + hw[None, :] * stride_hw,
                           mask=c_mask[:, None] & hw_mask[None, :], other=0).to(acc_ty)
            logit_terms += tile * w[:, None]
        logits = tl.where(hw_mask, tl.sum(logit_terms, axis=0) + bias, float("-inf"))
        new_max = nan_maximum(run_max, nan_max(logits, 0))  # NaN if a logit is: softmax is NaN then
        # The shift: the max, but 0 while every logit so far is -inf (exp(-inf - -inf) would be NaN
        # where softmax gives those logits weight 0 next to a finite one, or NaN for all if none is).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)  # 0 on the first tile (run_max = -inf)
        e = tl.exp(logits - shift)         # 0 on masked pixels
        run_sum = run_sum * rescale + tl.sum(e, axis=0)
        # Pass 2: acc = acc * rescale + x e, a chunk at a time. The chunk's x again: pass 1 has just
        # read it, so it comes from L1 or L2. Each chunk of acc was stored, for the previous tile,
        # by other threads than those that load it: the barrier makes those stores visible. The
        # first tile stores acc without reading the row (uninitialized memory: 0 * NaN is NaN).
        tl.debug_barrier()
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            tile = tl.load(x_image + c[:, None] * stride_c + hw[None, :] * stride_hw,
                           mask=c_mask[:, None] & hw_mask[None, :], other=0).to(acc_ty)
            acc = tl.load(acc_row + c, mask=c_mask & (start > hw_begin), other=0)
            tl.store(acc_row + c, acc * rescale + tl.sum(tile * e[None, :], axis=1), mask=c_mask)
        run_max = new_max
    return run_max, run_sum


@triton.jit
def _pool_kernel(
    x_ptr, w_ptr, b_ptr, acc_ptr, max_ptr, sum_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, split of H*W): pool_split's acc in the program's row of acc_ptr, its
    # max and sum at (split, n).
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    hw_begin = split * hw_per_split
    run_max, run_sum = pool_split(x_ptr + n * stride_n, w_ptr, tl.load(b_ptr), acc_ptr + (split * N + n) * C, C,
                                  hw_begin, tl.minimum(HW, hw_begin + hw_per_split), stride_c, stride_hw, 1,
                                  BLOCK_C, BLOCK_HW)
    tl.store(max_ptr + split * N + n, run_max)
    tl.store(sum_ptr + split * N + n, run_sum)


def _check_weights(op, x, weight, bias):
    C = x.shape[1]
    check_stats(op, x, (C,), weight=weight)
    check_stats(op, x, (1,), bias=bias)
    check_channels(op, "x", x)


def check_channels(op, name, t):
    """The pixel-tile kernels (attention pooling, scSE) take at most ATTENTION_POOL_MAX_CHANNELS."""
    if t.shape[1] > ATTENTION_POOL_MAX_CHANNELS:
        raise ValueError(f"{op}(): argument '{name}' has {t.shape[1]} channels; at most "
                         f"{ATTENTION_POOL_MAX_CHANNELS} are supported")


def attention_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    op = "attention_pool"
    check_activation(op, "x", x)
    _check_weights(op, x, weight, bias)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros((N, C), dtype=acc), x.new_zeros((N,), dtype=acc)
    block_c, block_hw = tile_shape(x)
    _, splits, per_split = split_hw(x, C, block_hw)  # every channel in each program
    partial = torch.empty((splits, N, C), dtype=acc, device=x.device)
    part_max = torch.empty((splits, N), dtype=acc, device=x.device)
    part_sum = torch.empty((splits, N), dtype=acc, device=x.device)
    with device_guard(x):
        _pool_kernel[(N, splits)](
            x, weight, bias, partial, part_max, part_sum, N, C, H * W, *strides(x), per_split,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=program_warps(block_c, block_hw, x.dtype),
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
def backward_split(dy_ptr, x_ptr, dx_ptr, image, ctx_row, dctx_row, gate_row, w_ptr, bias, lse, dw_row, C, hw_begin,
                   hw_end, stride_c, stride_hw, w_stride, HAS_GATE: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_HW: tl.constexpr):
    """One program's split [hw_begin, hw_end) of an image (at offset image): dx over it, and its
    share of d weight into dw_row. The weight is read in its own dtype (at w_stride), the math in
    dw_row's."""
    acc_ty = dw_row.dtype.element_ty
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        # Pass 1: the tile's logits and u - k, summed as the forward sums the logits.
        logit_terms = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
        u_minus_k_terms = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            w = tl.load(w_ptr + c * w_stride, mask=c_mask, other=0).to(acc_ty)
            ctx = tl.load(ctx_row + c, mask=c_mask, other=0)
            dctx = tl.load(dctx_row + c, mask=c_mask, other=0)
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            tile = tl.load(x_ptr + offsets, mask=c_mask[:, None] & hw_mask[None, :], other=0).to(acc_ty)
            logit_terms += tile * w[:, None]
            u_minus_k_terms += (tile - ctx[:, None]) * dctx[:, None]
        a = tl.where(hw_mask, tl.exp(tl.sum(logit_terms, axis=0) + bias - lse), 0.0)
        dl = a * tl.sum(u_minus_k_terms, axis=0)
        # Pass 2: dx and d weight, a chunk at a time; the chunk's x again (from L1 or L2: pass 1
        # has just read it). The barrier and the first tile's store: as in pool_split.
        tl.debug_barrier()
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            w = tl.load(w_ptr + c * w_stride, mask=c_mask, other=0).to(acc_ty)
            dctx = tl.load(dctx_row + c, mask=c_mask, other=0)
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            tile = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty)
            dx = a[None, :] * dctx[:, None] + dl[None, :] * w[:, None]
            if HAS_GATE:
                gate = tl.load(gate_row + c, mask=c_mask, other=0)
                dx += dy * gate[:, None]
            else:
                dx += dy
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw = tl.load(dw_row + c, mask=c_mask & (start > hw_begin), other=0)
            tl.store(dw_row + c, dw + tl.sum(tile * dl[None, :], axis=1), mask=c_mask)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, gate_ptr, ctx_ptr, dctx_ptr, w_ptr, b_ptr, lse_ptr, dx_ptr, dw_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    HAS_GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, split of H*W): dx over the split, and its share of d weight in the
    # program's row of dw_ptr.
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    hw_begin = split * hw_per_split
    backward_split(dy_ptr, x_ptr, dx_ptr, n * stride_n, ctx_ptr + n * C, dctx_ptr + n * C, gate_ptr + n * C, w_ptr,
                   tl.load(b_ptr), tl.load(lse_ptr + n), dw_ptr + (split * N + n) * C, C, hw_begin,
                   tl.minimum(HW, hw_begin + hw_per_split), stride_c, stride_hw, 1, HAS_GATE, BLOCK_C, BLOCK_HW)


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
    _, splits, per_split = split_hw(x, C, block_hw)  # every channel in each program
    dw_part = torch.empty((splits, N, C), dtype=acc, device=x.device)
    with device_guard(x):
        _backward_kernel[(N, splits)](
            dy, x, gate if gate is not None else dcontext, context, dcontext, weight, bias, lse, dx, dw_part,
            N, C, H * W, *strides(x), per_split,
            HAS_GATE=gate is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=program_warps(block_c, block_hw, x.dtype),
        )
    return dx, dw_part.sum((0, 1))
