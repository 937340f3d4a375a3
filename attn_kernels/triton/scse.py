"""scSE's primitives in Triton (concurrent spatial and channel squeeze-and-excitation), with the
signatures of the CUDA ones (csrc/scse.cu).

  scse_reduce(a, b, weight) -> (channel_sum, pixel_sum)                  one read of a (and b)
      t = a*b (a without b):  channel_sum[n,c] = sum_p t[n,c,p],  pixel_sum[n,p] = sum_c weight[c] t[n,c,p]
      (sum_c t without weight). The forward's scse_reduce(x, None, w) gives H*W times the mean the
      channel gate pools and the spatial gate's logits less their bias; the backward's
      scse_reduce(dy, x, None) gives the gradients of both gates.
  scse_apply(a, gc, gs, x, cbias, pcoef, weight) -> (out, dweight)       one read of a (and x), one write
      out = a*(gc[n,c] + gs[n,p]) (+ cbias[n,c] + pcoef[n,p]*weight[c]),
      dweight[c] = sum_n,p pcoef[n,p] x[n,c,p]
      The forward passes a = x and no x, cbias, pcoef or weight (dweight comes back empty); the
      backward passes a = dy and all four: dx, and the spatial conv's weight gradient from the
      same read of x.

A program owns one image's share of H*W (a split) and walks it a tile of pixels at a time, each
tile a chunk of channels per step: the tile of attention_pool (GC), whose one read of x also
serves a reduction over C per pixel and one over H*W per channel. Per-pixel sums are complete
when a tile's last chunk is read; per-channel sums over the split live in the program's own row
of a (splits, N, C) buffer, which the first tile stores and each later one loads and adds to, and
the splits are summed in order on the host. No atomics: bitwise reproducible. gc (N, C), gs,
pixel_sum, pcoef (N, H*W), cbias (N, C) and weight (C,) are in the accumulator dtype (float32;
float64 for float64 activations).
"""
import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from .attention_pool import check_channels, program_warps, tile_shape
from .channel_gate import check_activation, check_stats, device_guard, split_hw, strides


@triton.jit
def _reduce_kernel(
    a_ptr, b_ptr, w_ptr, csum_ptr, psum_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    HAS_B: tl.constexpr, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = csum_ptr.dtype.element_ty
    image = n * stride_n
    csum_row = csum_ptr + (split * N + n) * C
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        # The previous tile stored the row's chunks from the layout of a reduction's result, whose
        # threads need not be those that load them now: the barrier makes the stores visible.
        tl.debug_barrier()
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        # The per-pixel products are summed over the chunks where they lie, and over the channels
        # once at the end: no step reduces across threads.
        pixel_terms = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
        for c_start in range(0, C, BLOCK_C):
            # int64: c * stride_c passes 2^31 in an NCHW image of more than 2^31 elements
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            t = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
            if HAS_B:
                t *= tl.load(b_ptr + offsets, mask=mask, other=0).to(acc_ty)
            if HAS_W:
                pixel_terms += t * tl.load(w_ptr + c, mask=c_mask, other=0)[:, None]
            else:
                pixel_terms += t
            # The first tile stores the row's chunk without reading it (uninitialized memory:
            # 0 * NaN is NaN); each later one adds to it.
            csum = tl.load(csum_row + c, mask=c_mask & (start > hw_begin), other=0)
            tl.store(csum_row + c, csum + tl.sum(t, axis=1), mask=c_mask)
        tl.store(psum_ptr + n * HW + hw, tl.sum(pixel_terms, axis=0), mask=hw_mask)


def _plan(x):
    """(block_c, block_hw, splits, per_split): attention_pool's tile and split of H*W."""
    block_c, block_hw = tile_shape(x)
    _, splits, per_split = split_hw(x, x.shape[1], block_hw)  # every channel in each program
    return block_c, block_hw, splits, per_split


def scse_reduce(a: torch.Tensor, b, weight):
    op = "scse_reduce"
    check_activation(op, "a", a)
    if b is not None:
        check_activation(op, "b", b, like=a)
    check_channels(op, "a", a)
    N, C, H, W = a.shape
    check_stats(op, a, (C,), weight=weight)
    acc = acc_dtype(a.dtype)
    if a.numel() == 0:
        return a.new_zeros((N, C), dtype=acc), a.new_zeros((N, H * W), dtype=acc)
    block_c, block_hw, splits, per_split = _plan(a)
    csum = torch.empty((splits, N, C), dtype=acc, device=a.device)
    psum = torch.empty((N, H * W), dtype=acc, device=a.device)
    with device_guard(a):
        _reduce_kernel[(N, splits)](
            a, b if b is not None else a, weight if weight is not None else csum, csum, psum,
            N, C, H * W, *strides(a), per_split,
            HAS_B=b is not None, HAS_W=weight is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=program_warps(block_c, block_hw, a.dtype),
        )
    return csum.sum(0), psum


@triton.jit
def _apply_kernel(
    a_ptr, gc_ptr, gs_ptr, x_ptr, cbias_ptr, pcoef_ptr, w_ptr, out_ptr, dw_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = gc_ptr.dtype.element_ty
    image = n * stride_n
    gc_row, cbias_row = gc_ptr + n * C, cbias_ptr + n * C
    dw_row = dw_ptr + (split * N + n) * C
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        tl.debug_barrier()  # the previous tile's stores of the row: as in _reduce_kernel
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        gs = tl.load(gs_ptr + n * HW + hw, mask=hw_mask, other=0)
        if GRAD:
            pcoef = tl.load(pcoef_ptr + n * HW + hw, mask=hw_mask, other=0)
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            a = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
            gc = tl.load(gc_row + c, mask=c_mask, other=0)
            out = a * (gc[:, None] + gs[None, :])
            if GRAD:
                w = tl.load(w_ptr + c, mask=c_mask, other=0)
                out += tl.load(cbias_row + c, mask=c_mask, other=0)[:, None] + pcoef[None, :] * w[:, None]
                x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
                dw = tl.load(dw_row + c, mask=c_mask & (start > hw_begin), other=0)
                tl.store(dw_row + c, dw + tl.sum(x * pcoef[None, :], axis=1), mask=c_mask)
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def scse_apply(a: torch.Tensor, gc, gs, x, cbias, pcoef, weight):
    op = "scse_apply"
    check_activation(op, "a", a)
    check_channels(op, "a", a)
    N, C, H, W = a.shape
    grad = x is not None
    if {grad} != {cbias is not None, pcoef is not None, weight is not None}:
        raise ValueError(f"{op}(): arguments 'x', 'cbias', 'pcoef' and 'weight' must be all given or all None")
    check_stats(op, a, (N, C), gc=gc)
    check_stats(op, a, (N, H * W), gs=gs)
    if grad:
        check_activation(op, "x", x, like=a)
        check_stats(op, a, (N, C), cbias=cbias)
        check_stats(op, a, (N, H * W), pcoef=pcoef)
        check_stats(op, a, (C,), weight=weight)
    acc = acc_dtype(a.dtype)
    out = torch.empty_like(a)
    if a.numel() == 0:
        return out, a.new_zeros((C,) if grad else (0,), dtype=acc)
    block_c, block_hw, splits, per_split = _plan(a)
    dw = torch.empty((splits, N, C) if grad else (0,), dtype=acc, device=a.device)
    with device_guard(a):
        _apply_kernel[(N, splits)](
            a, gc, gs, x if grad else a, cbias if grad else gc, pcoef if grad else gs, weight if grad else gc,
            out, dw, N, C, H * W, *strides(a), per_split,
            GRAD=grad, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=program_warps(block_c, block_hw, a.dtype),
        )
    return out, dw.sum((0, 1)) if grad else dw
