"""scSE (concurrent spatial and channel squeeze-and-excitation) in Triton, its per-sample math in
the kernels: a forward of 2 launches, a backward of 3.

  scse_pool_excite(x, w1, b1, w2, b2, sse_weight, sse_bias) -> (planes, mean, logits)     1 launch
      one read of x: per pixel the spatial logits w . x[n, :, p] + b and gs = sigmoid(logits);
      per channel the split partials of the mean; the last program of each sample folds them and
      computes cSE's gate gc = sigmoid(fc2(relu(fc1(mean)))) (triton/excite.py's MLP)
  scse_grad_excite(dy, x, mean, logits, w1, b1, w2, b2) -> (planes, cSE's weight gradients)
      one read of dy and x: per pixel d logits = (sum_c dy x) gs (1 - gs); per channel the split
      partials of d gc = sum_p dy x; the last program of each sample differentiates cSE (cbias =
      d mean / HW) and sums its d logits; then the MLP's weight gradients over N in order. 2 launches
  scse_apply(a, planes[, x, sse_weight, sse_bias]) -> (out, d sse_weight, d sse_bias)      1 launch
      out = a*(gc[n,c] + gs[n,p]), and in the backward + cbias[n,c] + dlogits[n,p]*w[c], where the
      same read of x gives the split partials of d w; the grid's last program folds them, and the
      samples' sums of d logits into d b, in a fixed order

"planes" is one workspace whose first planes the apply reads: gc (N, C), (backward) cbias (N, C),
gs (N, H*W), (backward) d logits (N, H*W). A program owns one image's share of H*W (a split) and
walks it a tile of pixels at a time, each tile a chunk of channels per step: the tile of
attention_pool (GC), whose one read of x also serves a reduction over C per pixel and one over H*W
per channel. Per-pixel sums are complete when a tile's last chunk is read; per-channel sums over
the split live in the program's own row of a (splits, N, C) buffer, which the first tile stores
and each later one loads and adds to. The tickets, the fixed orders and the counters left at zero
are triton/excite.py's: no float atomics, bitwise reproducible. Statistics are in the accumulator
dtype (float32; float64 for float64 activations); weights are read in their own dtype and their
gradients written in it.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from . import channel_gate, excite
from .attention_pool import program_warps, tile_shape
from .channel_gate import cdiv, device_guard, next_power_of_2, split_hw, strides
from .excite import _excite_backward, _excite_gate, _fold_partials, _sigmoid
from .launch import launch


@triton.jit
def _pool_excite_kernel(
    x_ptr, sw_ptr, sb_ptr, mean_ptr, logits_ptr, ws_ptr, ticket_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    N, C, HW, R, stride_n, stride_c, stride_hw, hw_per_split, splits, sw_stride, w1_s0, w1_s1, w2_s0, w2_s1,
    HAS_SB: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (n, split of H*W). Workspace: gc (N, C), gs (N, H*W), the channel sums' split
    # partials (splits, N, C), the MLP's hidden layer (N, R).
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = mean_ptr.dtype.element_ty
    gs_ptr = ws_ptr + N * C
    part_ptr = gs_ptr + N * HW
    image = n * stride_n
    csum_row = part_ptr + (split * N + n) * C
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
            t = tl.load(x_ptr + image + c[:, None] * stride_c + hw[None, :] * stride_hw, mask=mask, other=0).to(acc_ty)
            pixel_terms += t * tl.load(sw_ptr + c * sw_stride, mask=c_mask, other=0).to(acc_ty)[:, None]
            # The first tile stores the row's chunk without reading it (uninitialized memory:
            # 0 * NaN is NaN); each later one adds to it.
            csum = tl.load(csum_row + c, mask=c_mask & (start > hw_begin), other=0)
            tl.store(csum_row + c, csum + tl.sum(t, axis=1), mask=c_mask)
        logits = tl.sum(pixel_terms, axis=0)
        if HAS_SB:
            logits += tl.load(sb_ptr).to(acc_ty)
        tl.store(logits_ptr + n * HW + hw, logits, mask=hw_mask)
        tl.store(gs_ptr + n * HW + hw, _sigmoid(logits), mask=hw_mask)

    # The last program of sample n folds the channel sums and computes cSE's gate.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + n, 1) == splits - 1:
        tl.store(ticket_ptr + n, 0)
        _fold_partials(part_ptr, mean_ptr, n, N, C, splits, HW, False, BLOCK_K)
        tl.debug_barrier()
        _excite_gate(n, mean_ptr, mean_ptr, ws_ptr, part_ptr + splits * N * C, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     C, R, 1, w1_s0, w1_s1, w2_s0, w2_s1, 0, POOL=0, MIX=0, ACT=_RELU, GATE=_SIGMOID, HAS_FC1=True,
                     HAS_B1=HAS_B1, HAS_B2=HAS_B2, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)


@triton.jit
def _grad_excite_kernel(
    dy_ptr, x_ptr, mean_ptr, logits_ptr, ws_ptr, ticket_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    N, C, HW, R, stride_n, stride_c, stride_hw, hw_per_split, splits, w1_s0, w1_s1, w2_s0, w2_s1,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (n, split of H*W). Workspace (_grad_workspace): gc and cbias (N, C each), gs
    # and d logits (N, H*W each), each sample's sum of d logits (N), the apply's d w partials
    # (splits, N, C), d gc's split partials (splits, N, C), then the MLP's hidden, dz and dh.
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = mean_ptr.dtype.element_ty
    gs_ptr = ws_ptr + 2 * N * C
    dl_ptr = gs_ptr + N * HW
    part_ptr = dl_ptr + N * HW + N + splits * N * C
    image = n * stride_n
    csum_row = part_ptr + (split * N + n) * C
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        tl.debug_barrier()  # the previous tile's stores of the row: as in _pool_excite_kernel
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        pixel_terms = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            t = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty) * tl.load(
                x_ptr + offsets, mask=mask, other=0).to(acc_ty)
            pixel_terms += t
            csum = tl.load(csum_row + c, mask=c_mask & (start > hw_begin), other=0)
            tl.store(csum_row + c, csum + tl.sum(t, axis=1), mask=c_mask)
        gs = _sigmoid(tl.load(logits_ptr + n * HW + hw, mask=hw_mask, other=0))
        tl.store(gs_ptr + n * HW + hw, gs, mask=hw_mask)
        tl.store(dl_ptr + n * HW + hw, tl.sum(pixel_terms, axis=0) * (gs * (1 - gs)), mask=hw_mask)

    # The last program of sample n sums its d logits (for d sse_bias) and differentiates cSE.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + n, 1) == splits - 1:
        tl.store(ticket_ptr + n, 0)
        # (names of its own: Triton types a variable alike before and inside a runtime if)
        total = tl.zeros([BLOCK_HW], dtype=acc_ty)
        for first_pixel in range(0, HW, BLOCK_HW):
            pixels = first_pixel + tl.arange(0, BLOCK_HW)
            total += tl.load(dl_ptr + n * HW + pixels, mask=pixels < HW, other=0, cache_modifier=".cg")
        tl.store(dl_ptr + N * HW + n, tl.sum(total, axis=0))
        _excite_backward(n, mean_ptr, mean_ptr, ws_ptr, part_ptr, part_ptr, part_ptr + splits * N * C, w1_ptr, b1_ptr,
                         w2_ptr, b2_ptr, N, C, HW, R, 1, splits, w1_s0, w1_s1, w2_s0, w2_s1, 0, POOL=0, MIX=0,
                         ACT=_RELU, GATE=_SIGMOID, HAS_FC1=True, HAS_B1=HAS_B1, HAS_B2=HAS_B2, BLOCK_K=BLOCK_K,
                         BLOCK_R=BLOCK_R)


@triton.jit
def _apply_kernel(
    a_ptr, x_ptr, ws_ptr, sw_ptr, out_ptr, dsw_ptr, dsb_ptr, ticket_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split, splits, sw_stride, dsw_stride, gs_at,
    GRAD: tl.constexpr, HAS_SB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program per (n, split of H*W). The workspace's planes: gc (N, C) first, gs at gs_at; in
    # the backward cbias (N, C) second, d logits after gs, then each sample's sum of d logits and
    # the d w partials (splits, N, C) this kernel writes.
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = ws_ptr.dtype.element_ty
    image = n * stride_n
    gc_row = ws_ptr + n * C
    cbias_row = ws_ptr + N * C + n * C
    gs_ptr = ws_ptr + gs_at
    dl_ptr = gs_ptr + N * HW
    dw_part = dl_ptr + N * HW + N
    dw_row = dw_part + (split * N + n) * C
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        tl.debug_barrier()  # the previous tile's stores of the row: as in _pool_excite_kernel
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        gs = tl.load(gs_ptr + n * HW + hw, mask=hw_mask, other=0)
        if GRAD:
            dl = tl.load(dl_ptr + n * HW + hw, mask=hw_mask, other=0)
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            a = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
            out = a * (tl.load(gc_row + c, mask=c_mask, other=0)[:, None] + gs[None, :])
            if GRAD:
                w = tl.load(sw_ptr + c * sw_stride, mask=c_mask, other=0).to(acc_ty)
                out += tl.load(cbias_row + c, mask=c_mask, other=0)[:, None] + dl[None, :] * w[:, None]
                x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
                dw = tl.load(dw_row + c, mask=c_mask & (start > hw_begin), other=0)
                tl.store(dw_row + c, dw + tl.sum(x * dl[None, :], axis=1), mask=c_mask)
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    if GRAD:
        # The grid's last program folds the d w partials in (split, n) order, and d b from the
        # samples' sums of d logits in n order (slot 0 of the counters: the per-sample ones are
        # all back at zero by the time this kernel runs).
        tl.debug_barrier()
        if tl.atomic_add(ticket_ptr, 1) == N * splits - 1:
            tl.store(ticket_ptr, 0)
            for c0 in range(0, C, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                c_mask = c < C
                dw = tl.zeros([BLOCK_K], dtype=acc_ty)
                for row in range(splits * N):
                    dw += tl.load(dw_part + row * C + c, mask=c_mask, other=0, cache_modifier=".cg")
                tl.store(dsw_ptr + c * dsw_stride, dw.to(dsw_ptr.dtype.element_ty), mask=c_mask)
            if HAS_SB:
                db = tl.zeros([BLOCK_K], dtype=acc_ty)
                for n0 in range(0, N, BLOCK_K):
                    rows = n0 + tl.arange(0, BLOCK_K)
                    db += tl.load(dl_ptr + N * HW + rows, mask=rows < N, other=0, cache_modifier=".cg")
                tl.store(dsb_ptr, tl.sum(db, axis=0).to(dsb_ptr.dtype.element_ty))


_RELU: tl.constexpr = tl.constexpr(excite.ACT_CODES["relu"])
_SIGMOID: tl.constexpr = tl.constexpr(excite.ACT_CODES["sigmoid"])


class ScsePlan(NamedTuple):
    grid: tuple      # (N, splits)
    hw_per_split: int
    block_c: int
    block_hw: int
    block_k: int
    block_r: int
    warps: int
    acc: torch.dtype


_plans = {}


def _plan(x: torch.Tensor, R: int) -> ScsePlan:
    """attention_pool's tile and split of H*W, and the MLP's chunks, cached per shape, strides,
    dtype and device (with the tuning knob tests turn)."""
    key = (*x.shape, *x.stride(), x.dtype, x.device, R, channel_gate.TARGET_PROGRAMS_PER_SM)
    plan = _plans.get(key)
    if plan is None:
        N, C = x.shape[:2]
        block_c, block_hw = tile_shape(x)
        _, splits, per_split = split_hw(x, C, block_hw)  # every channel in each program
        plan = ScsePlan((N, splits), per_split, block_c, block_hw, min(next_power_of_2(C), 64),
                        min(next_power_of_2(R), 64), program_warps(block_c, block_hw, x.dtype), acc_dtype(x.dtype))
        _plans[key] = plan
    return plan


def _mlp_scalars(w1, w2):
    return (*w1.stride()[:2], *w2.stride()[:2])


def scse_pool_excite(x, w1, b1, w2, b2, sse_weight, sse_bias):
    """(planes, mean (N, C), logits (N, H*W)): gc and gs for scse_apply in planes; mean and logits
    for the backward. Weights as smp's SCSEModule holds them (1x1 convs); x checked by the caller."""
    N, C, H, W = x.shape
    HW, R = H * W, w1.shape[0]
    acc = acc_dtype(x.dtype)
    mean = x.new_empty((N, C), dtype=acc)
    logits = x.new_empty((N, HW), dtype=acc)
    if x.numel() == 0:
        return x.new_empty((N * C + N * HW,), dtype=acc), mean.zero_(), logits.zero_()
    plan = _plan(x, R)
    splits = plan.grid[1]
    ws = x.new_empty((N * C + N * HW + splits * N * C + N * R,), dtype=acc)
    with device_guard(x):
        launch(_pool_excite_kernel, plan.grid,
               (x, sse_weight, sse_bias if sse_bias is not None else sse_weight, mean, logits, ws,
                excite._tickets_for(x.device, N), w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2),
               (N, C, HW, R, *strides(x), plan.hw_per_split, splits, sse_weight.stride(1), *_mlp_scalars(w1, w2)),
               dict(HAS_SB=sse_bias is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None, BLOCK_C=plan.block_c,
                    BLOCK_HW=plan.block_hw, BLOCK_K=plan.block_k, BLOCK_R=plan.block_r), plan.warps)
    return ws, mean, logits


def scse_grad_excite(dy, x, mean, logits, w1, b1, w2, b2):
    """(planes, [d w1, d b1, d w2, d b2]): gc, cbias, gs and d logits for scse_apply's backward in
    planes (and room for its d w partials); cSE's weight gradients (None for absent biases). dy in
    x's layout, checked by the caller."""
    N, C, H, W = x.shape
    HW, R = H * W, w1.shape[0]
    grads = [torch.empty_like(t) if t is not None else None for t in (w1, b1, w2, b2)]
    if x.numel() == 0:
        return x.new_empty((2 * N * C + 2 * HW * N + N,), dtype=acc_dtype(x.dtype)), \
            [g.zero_() if g is not None else None for g in grads]
    plan = _plan(x, R)
    splits = plan.grid[1]
    hidden_at = 2 * N * C + 2 * N * HW + N + 2 * splits * N * C
    dz_at = hidden_at + N * R
    dh_at = dz_at + N * C
    ws = x.new_empty((dh_at + N * R,), dtype=plan.acc)
    gw1, gb1, gw2, gb2 = (g if g is not None else ws for g in grads)
    with device_guard(x):
        launch(_grad_excite_kernel, plan.grid,
               (dy, x, mean, logits, ws, excite._tickets_for(x.device, N), w1, b1 if b1 is not None else w1, w2,
                b2 if b2 is not None else w2),
               (N, C, HW, R, *strides(x), plan.hw_per_split, splits, *_mlp_scalars(w1, w2)),
               dict(HAS_B1=b1 is not None, HAS_B2=b2 is not None, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
                    BLOCK_K=plan.block_k, BLOCK_R=plan.block_r), plan.warps)
        tiles = 2 * cdiv(C, plan.block_k) * cdiv(R, plan.block_r)
        launch(excite._mlp_weight_grad_kernel, (tiles,), (mean, mean, ws, gw1, gb1, gw2, gb2),
               (hidden_at, dz_at, dh_at, N, C, R, *gw1.stride()[:2], *gw2.stride()[:2]),
               dict(POOL=0, ACT=_RELU, HAS_FC1=True, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
                    BLOCK_K=plan.block_k, BLOCK_R=plan.block_r), 4)
    return ws, grads


def scse_apply(a, planes, x=None, sse_weight=None, sse_bias=None):
    """out = a*(gc + gs), or in the backward (x and sse_weight given) out = a*(gc + gs) + cbias +
    dlogits*w, with d sse_weight and d sse_bias (None without the bias) from the same read of x.
    Returns (out, d w, d b)."""
    N, C, H, W = a.shape
    HW = H * W
    grad = x is not None
    out = torch.empty_like(a)
    dsw = torch.empty_like(sse_weight) if grad else None
    dsb = torch.empty_like(sse_bias) if grad and sse_bias is not None else None
    if a.numel() == 0:
        return out, dsw.zero_() if grad else None, dsb.zero_() if dsb is not None else None
    plan = _plan(a, 1)
    with device_guard(a):
        launch(_apply_kernel, plan.grid,
               (a, x if grad else a, planes, sse_weight if grad else planes, out, dsw if grad else planes,
                dsb if dsb is not None else planes, excite._tickets_for(a.device, N)),
               (N, C, HW, *strides(a), plan.hw_per_split, plan.grid[1], sse_weight.stride(1) if grad else 0,
                dsw.stride(1) if grad else 0, 2 * N * C if grad else N * C),
               dict(GRAD=grad, HAS_SB=dsb is not None, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
                    BLOCK_K=plan.block_k), plan.warps)
    return out, dsw, dsb
