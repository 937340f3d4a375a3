"""GC (global context) in Triton, its per-sample math in the kernels: a forward of 2 launches, a
backward of 3.

  gc_pool_transform(x, attn_weight, attn_bias, scale, add, ...) -> (planes, context, lse)   1 launch
      one read of x: per split of H*W the online-softmax partials (attention_pool.pool_split) or
      the channel sums ('avg'); the last program of each sample folds them in split order into
      the context (and the log-sum-exp of the logits), and computes the transforms
      t(ctx) = fc2(act(LayerNorm(fc1(ctx)))): gate(t_scale) and t_add into the first two (N, C)
      planes (the gate is 1 without the scale term)
  gc_grad_transform(dy, x, context, lse, attn_weight, attn_bias, scale, add, ...)
      -> (planes, d attn_weight, d attn_bias, d scale, d add)                              3 launches
      one read of dy and x: the split partials of sum dy*x (the scale's d gate) and sum dy (the
      add's d t); the last program of each sample recomputes the transforms, differentiates them
      by hand (LayerNorm's backward as ops/gc.py's transform_backward) and writes the gate and
      d context (/ H*W for 'avg') into the first two planes, and the per-sample terms of the
      weight gradients; a kernel sums those over N in a fixed order; then the apply: 'att' reads
      dy and x again (attention_pool.backward_split), writes dx, and the grid's last program folds
      d attn_weight (and d attn_bias) in a fixed order; 'avg' is channel_gate's gate apply
  gate apply (channel_gate.launch_gate_apply), forward: y = x*gate + add                   1 launch

The tickets, fixed orders and counters left at zero are triton/excite.py's (_tickets_for): no
float atomics, bitwise reproducible, no host sync. A program owns one image's split of H*W, every
channel (attention_pool's tile and split). Statistics and the per-sample math are in the
accumulator dtype (float32; float64 for float64 x); weights are read in their own dtype and
their gradients written in it.
"""
import importlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from . import channel_gate
from .attention_pool import backward_split, pool_split, program_warps, tile_shape
from .channel_gate import cdiv, device_guard, launch_gate_apply, nan_maximum, next_power_of_2, split_hw, strides
from .excite import (
    ACT_CODES, _activation, _activation_backward, _fold_chunk, _fold_partials, _mlp_hidden, _mlp_logits, _tickets_for,
)
from .launch import launch

# The module, for its tile knob that tests turn (the package exports a function so named).
_attention_pool = importlib.import_module(".attention_pool", __package__)
# The per-sample terms a transform's backward leaves for the weight-gradient kernel, each (N, R)
# but dz (N, C): LayerNorm's affine output, its activation, the normalized hidden units,
# d pre-activation, d fc1 output.
_TERMS_R = 5


# ---- the reductions over one program's split ---------------------------------------------------

@triton.jit
def _sum_split(x_image, sum_row, C, hw_begin, hw_end, stride_c, stride_hw, BLOCK_C: tl.constexpr,
               BLOCK_HW: tl.constexpr):
    """sum_row[c] = sum of x over the split: the first tile stores its chunk (the row is
    uninitialized: 0 * NaN is NaN), each later one adds to it."""
    acc_ty = sum_row.dtype.element_ty
    for start in range(hw_begin, hw_end, BLOCK_HW):
        # The previous tile stored the row's chunks from a reduction's layout, whose threads need
        # not be those that load them now: the barrier makes the stores visible.
        tl.debug_barrier()
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        for c_start in range(0, C, BLOCK_C):
            # int64: c * stride_c passes 2^31 in an NCHW image of more than 2^31 elements
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            t = tl.load(x_image + c[:, None] * stride_c + hw[None, :] * stride_hw,
                        mask=c_mask[:, None] & hw_mask[None, :], other=0).to(acc_ty)
            total = tl.load(sum_row + c, mask=c_mask & (start > hw_begin), other=0)
            tl.store(sum_row + c, total + tl.sum(t, axis=1), mask=c_mask)


@triton.jit
def _grad_split(dy_ptr, x_ptr, image, dot_row, dy_row, C, hw_begin, hw_end, stride_c, stride_hw,
                HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dot_row[c] = sum of dy*x over the split (the scale's), dy_row[c] = sum of dy (the add's);
    stored and added to as in _sum_split."""
    acc_ty = dot_row.dtype.element_ty
    for start in range(hw_begin, hw_end, BLOCK_HW):
        tl.debug_barrier()  # the previous tile's stores of the rows: as in _sum_split
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        for c_start in range(0, C, BLOCK_C):
            c = (c_start + tl.arange(0, BLOCK_C)).to(tl.int64)
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            offsets = image + c[:, None] * stride_c + hw[None, :] * stride_hw
            g = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty)
            first = c_mask & (start > hw_begin)
            if HAS_SCALE:
                t = g * tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
                tl.store(dot_row + c, tl.load(dot_row + c, mask=first, other=0) + tl.sum(t, axis=1), mask=c_mask)
            if HAS_ADD:
                tl.store(dy_row + c, tl.load(dy_row + c, mask=first, other=0) + tl.sum(g, axis=1), mask=c_mask)


@triton.jit
def _fold_softmax(part_ptr, ctx_ptr, lse_ptr, n, N, C, splits, BLOCK_K: tl.constexpr):
    """context[n] and lse[n] from the splits' online-softmax partials (acc (splits, N, C), then
    max and sum (splits, N) each), in split order: combine_splits' math (attention_pool.py)."""
    max_ptr = part_ptr + splits * N * C
    sum_ptr = max_ptr + splits * N
    total_max = tl.load(max_ptr + n, cache_modifier=".cg")
    for split in range(1, splits):
        total_max = nan_maximum(total_max, tl.load(max_ptr + split * N + n, cache_modifier=".cg"))
    total = tl.load(sum_ptr + n, cache_modifier=".cg") * tl.exp(tl.load(max_ptr + n, cache_modifier=".cg") - total_max)
    for split in range(1, splits):
        total += tl.load(sum_ptr + split * N + n, cache_modifier=".cg") * tl.exp(
            tl.load(max_ptr + split * N + n, cache_modifier=".cg") - total_max)
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        c_mask = c < C
        acc = tl.zeros([BLOCK_K], dtype=ctx_ptr.dtype.element_ty)
        for split in range(splits):
            rescale = tl.exp(tl.load(max_ptr + split * N + n, cache_modifier=".cg") - total_max)
            acc += tl.load(part_ptr + (split * N + n) * C + c, mask=c_mask, other=0, cache_modifier=".cg") * rescale
        tl.store(ctx_ptr + n * C + c, acc / total, mask=c_mask)
    tl.store(lse_ptr + n, total_max + tl.log(total))


# ---- a transform of one sample ----------------------------------------------------------------

@triton.jit
def _transform_hidden(n, ctx_ptr, pre_ptr, norm_ptr, w1_ptr, b1_ptr, lnw_ptr, lnb_ptr, C, R, eps, w1_s0, w1_s1,
                      ln_s, WRITE_NORM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """pre[n] = LayerNorm(fc1(ctx[n])) with its affine (act's input), (N, R); norm[n] the
    normalized units (WRITE_NORM). Returns 1 / sqrt(var + eps)."""
    _mlp_hidden(ctx_ptr, ctx_ptr, w1_ptr, b1_ptr, pre_ptr, n, C, R, w1_s0, w1_s1, POOL=0, BRANCHES=1, HAS_B1=True,
                BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    tl.debug_barrier()  # fc1's output, stored from a reduction's layout
    row = pre_ptr + n * R
    acc_ty = pre_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_R], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        total += tl.load(row + r, mask=r < R, other=0)
    mean = tl.sum(total, axis=0) / R
    squares = tl.zeros([BLOCK_R], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        centered = tl.where(r_mask, tl.load(row + r, mask=r_mask, other=0) - mean, 0.0)
        squares += centered * centered
    var_eps = tl.sum(squares, axis=0) / R + eps
    if var_eps.dtype == tl.float64:
        rstd = 1.0 / tl.sqrt(var_eps)
    else:
        rstd = 1.0 / tl.sqrt_rn(var_eps)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        normalized = (tl.load(row + r, mask=r_mask, other=0) - mean) * rstd
        if WRITE_NORM:
            tl.store(norm_ptr + n * R + r, normalized, mask=r_mask)
        affine = normalized * tl.load(lnw_ptr + r * ln_s, mask=r_mask, other=0).to(acc_ty) + tl.load(
            lnb_ptr + r * ln_s, mask=r_mask, other=0).to(acc_ty)
        tl.store(row + r, affine, mask=r_mask)
    tl.debug_barrier()  # act's input, read next by other threads
    return rstd


@triton.jit
def _transform_out(n, ctx_ptr, pre_ptr, out_ptr, w1_ptr, b1_ptr, lnw_ptr, lnb_ptr, w2_ptr, b2_ptr, C, R, eps,
                   w1_s0, w1_s1, w2_s0, w2_s1, ln_s, IS_GATE: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[n] = t(ctx[n]), or gate(t(ctx[n])) with IS_GATE, into an (N, C) plane."""
    _transform_hidden(n, ctx_ptr, pre_ptr, pre_ptr, w1_ptr, b1_ptr, lnw_ptr, lnb_ptr, C, R, eps, w1_s0, w1_s1, ln_s,
                      False, BLOCK_K, BLOCK_R)
    for c0 in range(0, C, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        z = _mlp_logits(ctx_ptr, ctx_ptr, pre_ptr, w2_ptr, b2_ptr, n, k, k_mask, C, R, w2_s0, w2_s1, POOL=0,
                        BRANCHES=1, HAS_FC1=True, ACT=ACT, HAS_B2=True, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
        if IS_GATE:
            z = _activation(z, GATE)
        tl.store(out_ptr + n * C + k, z, mask=k_mask)


@triton.jit
def _transform_backward(n, ctx_ptr, terms_ptr, dctx_ptr, dout_part, gate_ptr, w1_ptr, b1_ptr, lnw_ptr, lnb_ptr,
                        w2_ptr, b2_ptr, N, C, R, splits, eps, w1_s0, w1_s1, w2_s0, w2_s1, ln_s,
                        IS_GATE: tl.constexpr, FIRST: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sample n's transform differentiated, from the split partials of d out (d gate with
    IS_GATE, which also writes the gate into gate_ptr's plane): d ctx stored (FIRST) or added into
    dctx_ptr's plane, and the per-sample terms of the weight gradients into terms_ptr's blocks."""
    acc_ty = ctx_ptr.dtype.element_ty
    pre_ptr = terms_ptr
    act_ptr = pre_ptr + N * R
    norm_ptr = act_ptr + N * R
    dpre_ptr = norm_ptr + N * R
    dhid_ptr = dpre_ptr + N * R
    dz_ptr = dhid_ptr + N * R
    rstd = _transform_hidden(n, ctx_ptr, pre_ptr, norm_ptr, w1_ptr, b1_ptr, lnw_ptr, lnb_ptr, C, R, eps, w1_s0, w1_s1,
                             ln_s, True, BLOCK_K, BLOCK_R)
    # dz = d loss / d fc2's output
    for c0 in range(0, C, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        dz = _fold_chunk(dout_part, n, k, k_mask, N, C, splits, False, BLOCK_K)
        if IS_GATE:
            z = _mlp_logits(ctx_ptr, ctx_ptr, pre_ptr, w2_ptr, b2_ptr, n, k, k_mask, C, R, w2_s0, w2_s1, POOL=0,
                            BRANCHES=1, HAS_FC1=True, ACT=ACT, HAS_B2=True, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
            tl.store(gate_ptr + n * C + k, _activation(z, GATE), mask=k_mask)
            dz = _activation_backward(dz, z, GATE)
        tl.store(dz_ptr + n * C + k, dz, mask=k_mask)
    tl.debug_barrier()
    # d pre = act'(pre) W2^T dz, and LayerNorm's two means: of d norm and of d norm * norm
    dnorm_sum = tl.zeros([BLOCK_R], dtype=acc_ty)
    dnorm_dot = tl.zeros([BLOCK_R], dtype=acc_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        dact = tl.zeros([BLOCK_R], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_K):
            k = c0 + tl.arange(0, BLOCK_K)
            k_mask = k < C
            w = tl.load(w2_ptr + k[:, None] * w2_s0 + r[None, :] * w2_s1, mask=k_mask[:, None] & r_mask[None, :],
                        other=0).to(acc_ty)
            dact += tl.sum(w * tl.load(dz_ptr + n * C + k, mask=k_mask, other=0)[:, None], axis=0)
        pre = tl.load(pre_ptr + n * R + r, mask=r_mask, other=0)
        tl.store(act_ptr + n * R + r, _activation(pre, ACT), mask=r_mask)
        dpre = tl.where(r_mask, _activation_backward(dact, pre, ACT), 0.0)
        tl.store(dpre_ptr + n * R + r, dpre, mask=r_mask)
        dnorm = dpre * tl.load(lnw_ptr + r * ln_s, mask=r_mask, other=0).to(acc_ty)
        dnorm_sum += dnorm
        dnorm_dot += dnorm * tl.load(norm_ptr + n * R + r, mask=r_mask, other=0)
    dnorm_mean = tl.sum(dnorm_sum, axis=0) / R
    dnorm_dot_mean = tl.sum(dnorm_dot, axis=0) / R
    tl.debug_barrier()
    # d hidden = rstd (d norm - mean(d norm) - norm mean(d norm * norm))
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        dnorm = tl.load(dpre_ptr + n * R + r, mask=r_mask, other=0) * tl.load(lnw_ptr + r * ln_s, mask=r_mask,
                                                                              other=0).to(acc_ty)
        norm = tl.load(norm_ptr + n * R + r, mask=r_mask, other=0)
        tl.store(dhid_ptr + n * R + r, rstd * (dnorm - dnorm_mean - norm * dnorm_dot_mean), mask=r_mask)
    tl.debug_barrier()
    # d ctx = W1^T d hidden
    for c0 in range(0, C, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        dctx = tl.zeros([BLOCK_K], dtype=acc_ty)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_mask = r < R
            w = tl.load(w1_ptr + r[:, None] * w1_s0 + k[None, :] * w1_s1, mask=r_mask[:, None] & k_mask[None, :],
                        other=0).to(acc_ty)
            dctx += tl.sum(w * tl.load(dhid_ptr + n * R + r, mask=r_mask, other=0)[:, None], axis=0)
        if not FIRST:
            dctx = tl.load(dctx_ptr + n * C + k, mask=k_mask, other=0) + dctx
        tl.store(dctx_ptr + n * C + k, dctx, mask=k_mask)
    tl.debug_barrier()


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _pool_transform_kernel(
    x_ptr, att_w_ptr, att_b_ptr, ctx_ptr, lse_ptr, ws_ptr, ticket_ptr,
    s_w1, s_b1, s_lnw, s_lnb, s_w2, s_b2, a_w1, a_b1, a_lnw, a_lnb, a_w2, a_b2,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split, splits, att_w_stride, R_S, R_A, s_eps, a_eps,
    s_w1_s0, s_w1_s1, s_w2_s0, s_w2_s1, s_ln_s, a_w1_s0, a_w1_s1, a_w2_s0, a_w2_s1, a_ln_s,
    ATT: tl.constexpr, HAS_ATT_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr,
    ACT: tl.constexpr, GATE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (n, split of H*W). Workspace (_forward_size): gate and add (N, C each), the
    # split partials (acc (splits, N, C), max and sum (splits, N) each; 'avg': sums (splits, N,
    # C)), the transforms' hidden units (N, R_S), (N, R_A).
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = ctx_ptr.dtype.element_ty
    part_ptr = ws_ptr + 2 * N * C
    row = part_ptr + (split * N + n) * C
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    if ATT:
        if HAS_ATT_BIAS:
            bias = tl.load(att_b_ptr).to(acc_ty)
        else:
            bias = 0.0
        run_max, run_sum = pool_split(x_ptr + n * stride_n, att_w_ptr, bias, row, C, hw_begin, hw_end, stride_c,
                                      stride_hw, att_w_stride, BLOCK_C, BLOCK_HW)
        tl.store(part_ptr + splits * N * C + split * N + n, run_max)
        tl.store(part_ptr + splits * N * C + splits * N + split * N + n, run_sum)
        hid_ptr = part_ptr + splits * N * C + 2 * splits * N
    else:
        _sum_split(x_ptr + n * stride_n, row, C, hw_begin, hw_end, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
        hid_ptr = part_ptr + splits * N * C

    # The last program of sample n folds the partials and computes its transforms.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + n, 1) == splits - 1:
        tl.store(ticket_ptr + n, 0)
        if ATT:
            _fold_softmax(part_ptr, ctx_ptr, lse_ptr, n, N, C, splits, BLOCK_K)
        else:
            _fold_partials(part_ptr, ctx_ptr, n, N, C, splits, HW, False, BLOCK_K)
        tl.debug_barrier()
        if HAS_SCALE:
            _transform_out(n, ctx_ptr, hid_ptr, ws_ptr, s_w1, s_b1, s_lnw, s_lnb, s_w2, s_b2, C, R_S, s_eps, s_w1_s0,
                           s_w1_s1, s_w2_s0, s_w2_s1, s_ln_s, True, ACT, GATE, BLOCK_K, BLOCK_R)
        else:
            for c0 in range(0, C, BLOCK_K):
                k = c0 + tl.arange(0, BLOCK_K)
                tl.store(ws_ptr + n * C + k, tl.full([BLOCK_K], 1.0, dtype=acc_ty), mask=k < C)
        if HAS_ADD:
            _transform_out(n, ctx_ptr, hid_ptr + N * R_S, ws_ptr + N * C, a_w1, a_b1, a_lnw, a_lnb, a_w2, a_b2, C, R_A,
                           a_eps, a_w1_s0, a_w1_s1, a_w2_s0, a_w2_s1, a_ln_s, False, ACT, GATE, BLOCK_K, BLOCK_R)


# ---- backward ---------------------------------------------------------------------------------

@triton.jit
def _grad_transform_kernel(
    dy_ptr, x_ptr, ctx_ptr, ws_ptr, ticket_ptr,
    s_w1, s_b1, s_lnw, s_lnb, s_w2, s_b2, a_w1, a_b1, a_lnw, a_lnb, a_w2, a_b2,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split, splits, R_S, R_A, s_eps, a_eps, scale_at, add_at,
    s_w1_s0, s_w1_s1, s_w2_s0, s_w2_s1, s_ln_s, a_w1_s0, a_w1_s1, a_w2_s0, a_w2_s1, a_ln_s,
    ATT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ADD: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (n, split of H*W). Workspace (_Plan): gate and d context (N, C each; 'avg':
    # d context / H*W, the apply's bias), the split partials of sum dy*x and of sum dy (splits, N,
    # C each), each transform's per-sample terms at scale_at and add_at (_transform_backward).
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    dot_ptr = ws_ptr + 2 * N * C
    dysum_ptr = dot_ptr + splits * N * C
    hw_begin = split * hw_per_split
    _grad_split(dy_ptr, x_ptr, n * stride_n, dot_ptr + (split * N + n) * C, dysum_ptr + (split * N + n) * C, C,
                hw_begin, tl.minimum(HW, hw_begin + hw_per_split), stride_c, stride_hw, HAS_SCALE, HAS_ADD, BLOCK_C,
                BLOCK_HW)

    # The last program of sample n differentiates its transforms.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + n, 1) == splits - 1:
        tl.store(ticket_ptr + n, 0)
        dctx_ptr = ws_ptr + N * C
        if HAS_SCALE:
            _transform_backward(n, ctx_ptr, ws_ptr + scale_at, dctx_ptr, dot_ptr, ws_ptr, s_w1, s_b1, s_lnw, s_lnb,
                                s_w2, s_b2, N, C, R_S, splits, s_eps, s_w1_s0, s_w1_s1, s_w2_s0, s_w2_s1, s_ln_s,
                                True, True, ACT, GATE, BLOCK_K, BLOCK_R)
        else:
            for c0 in range(0, C, BLOCK_K):
                k = c0 + tl.arange(0, BLOCK_K)
                tl.store(ws_ptr + n * C + k, tl.full([BLOCK_K], 1.0, dtype=ctx_ptr.dtype.element_ty), mask=k < C)
        if HAS_ADD:
            _transform_backward(n, ctx_ptr, ws_ptr + add_at, dctx_ptr, dysum_ptr, ws_ptr, a_w1, a_b1, a_lnw, a_lnb,
                                a_w2, a_b2, N, C, R_A, splits, a_eps, a_w1_s0, a_w1_s1, a_w2_s0, a_w2_s1, a_ln_s,
                                False, not HAS_SCALE, ACT, GATE, BLOCK_K, BLOCK_R)
        if not ATT:
            # The mean's gradient spread over H*W: the apply's bias.
            for c0 in range(0, C, BLOCK_K):
                k = c0 + tl.arange(0, BLOCK_K)
                k_mask = k < C
                tl.store(dctx_ptr + n * C + k, tl.load(dctx_ptr + n * C + k, mask=k_mask, other=0) / HW, mask=k_mask)


@triton.jit
def _sum_outer(u_ptr, u_row, v_ptr, v_row, out_ptr, out_s0, out_s1, bias_ptr, i_tile, j_tile, I, J, N,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """out[i, j] = sum over n of u[n, i] v[n, j], and (the tile at j = 0) bias[i] = sum over n of
    u[n, i], in n order, written in the outputs' dtypes."""
    i = i_tile * BLOCK_I + tl.arange(0, BLOCK_I)
    j = j_tile * BLOCK_J + tl.arange(0, BLOCK_J)
    i_mask = i < I
    j_mask = j < J
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=u_ptr.dtype.element_ty)
    bias = tl.zeros([BLOCK_I], dtype=u_ptr.dtype.element_ty)
    for n in range(N):
        u = tl.load(u_ptr + n * u_row + i, mask=i_mask, other=0)
        acc += u[:, None] * tl.load(v_ptr + n * v_row + j, mask=j_mask, other=0)[None, :]
        bias += u
    tl.store(out_ptr + i[:, None] * out_s0 + j[None, :] * out_s1, acc.to(out_ptr.dtype.element_ty),
             mask=i_mask[:, None] & j_mask[None, :])
    if j_tile == 0:
        tl.store(bias_ptr + i, bias.to(bias_ptr.dtype.element_ty), mask=i_mask)


@triton.jit
def _transform_weight_grads(tile, ctx_ptr, terms_ptr, gw1, gb1, glnw, glnb, gw2, gb2, N, C, R, dw1_s0, dw1_s1,
                            dw2_s0, dw2_s1, dln_s, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program `tile` of a transform's weight gradients: tiles of W2 (C, R), then of W1 (R, C)
    (with their biases), then chunks of LayerNorm's weight and bias; each sums over n in order."""
    act_ptr = terms_ptr + N * R
    norm_ptr = act_ptr + N * R
    dpre_ptr = norm_ptr + N * R
    dhid_ptr = dpre_ptr + N * R
    dz_ptr = dhid_ptr + N * R
    r_tiles = tl.cdiv(R, BLOCK_R)
    c_tiles = tl.cdiv(C, BLOCK_K)
    if tile < c_tiles * r_tiles:
        _sum_outer(dz_ptr, C, act_ptr, R, gw2, dw2_s0, dw2_s1, gb2, tile // r_tiles, tile % r_tiles, C, R, N,
                   BLOCK_K, BLOCK_R)
    elif tile < 2 * c_tiles * r_tiles:
        w1_tile = tile - c_tiles * r_tiles
        _sum_outer(dhid_ptr, R, ctx_ptr, C, gw1, dw1_s0, dw1_s1, gb1, w1_tile // c_tiles, w1_tile % c_tiles, R, C, N,
                   BLOCK_R, BLOCK_K)
    else:
        r = (tile - 2 * c_tiles * r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < R
        dweight = tl.zeros([BLOCK_R], dtype=terms_ptr.dtype.element_ty)
        dbias = tl.zeros([BLOCK_R], dtype=terms_ptr.dtype.element_ty)
        for n in range(N):
            dpre = tl.load(dpre_ptr + n * R + r, mask=r_mask, other=0)
            dweight += dpre * tl.load(norm_ptr + n * R + r, mask=r_mask, other=0)
            dbias += dpre
        tl.store(glnw + r * dln_s, dweight.to(glnw.dtype.element_ty), mask=r_mask)
        tl.store(glnb + r * dln_s, dbias.to(glnb.dtype.element_ty), mask=r_mask)


@triton.jit
def _weight_grad_kernel(
    ctx_ptr, ws_ptr, s_gw1, s_gb1, s_glnw, s_glnb, s_gw2, s_gb2, a_gw1, a_gb1, a_glnw, a_glnb, a_gw2, a_gb2,
    N, C, R_S, R_A, scale_at, add_at, s_dw1_s0, s_dw1_s1, s_dw2_s0, s_dw2_s1, s_dln_s,
    a_dw1_s0, a_dw1_s1, a_dw2_s0, a_dw2_s1, a_dln_s,
    HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # The scale transform's programs first (_transform_weight_grads), then the add's.
    pid = tl.program_id(0)
    if HAS_SCALE:
        scale_programs = (2 * tl.cdiv(C, BLOCK_K) + 1) * tl.cdiv(R_S, BLOCK_R)
    else:
        scale_programs = 0
    if pid < scale_programs:
        _transform_weight_grads(pid, ctx_ptr, ws_ptr + scale_at, s_gw1, s_gb1, s_glnw, s_glnb, s_gw2, s_gb2, N, C, R_S,
                                s_dw1_s0, s_dw1_s1, s_dw2_s0, s_dw2_s1, s_dln_s, BLOCK_K, BLOCK_R)
    else:
        _transform_weight_grads(pid - scale_programs, ctx_ptr, ws_ptr + add_at, a_gw1, a_gb1, a_glnw, a_glnb, a_gw2,
                                a_gb2, N, C, R_A, a_dw1_s0, a_dw1_s1, a_dw2_s0, a_dw2_s1, a_dln_s, BLOCK_K, BLOCK_R)


@triton.jit
def _attention_backward_kernel(
    dy_ptr, x_ptr, ctx_ptr, lse_ptr, ws_ptr, att_w_ptr, att_b_ptr, dx_ptr, datt_w_ptr, datt_b_ptr, ticket_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split, splits, att_w_stride, datt_w_stride, dw_at,
    HAS_SCALE: tl.constexpr, HAS_ATT_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (n, split of H*W): dx over the split (backward_split, the gate and d context
    # from the workspace's first two planes), its share of d attn_weight in its row of the
    # (splits, N, C) partials at dw_at.
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    acc_ty = ctx_ptr.dtype.element_ty
    dw_part = ws_ptr + dw_at
    if HAS_ATT_BIAS:
        bias = tl.load(att_b_ptr).to(acc_ty)
    else:
        bias = 0.0
    hw_begin = split * hw_per_split
    backward_split(dy_ptr, x_ptr, dx_ptr, n * stride_n, ctx_ptr + n * C, ws_ptr + N * C + n * C, ws_ptr + n * C,
                   att_w_ptr, bias, tl.load(lse_ptr + n), dw_part + (split * N + n) * C, C, hw_begin,
                   tl.minimum(HW, hw_begin + hw_per_split), stride_c, stride_hw, att_w_stride, HAS_SCALE, BLOCK_C,
                   BLOCK_HW)
    # The grid's last program folds d attn_weight in (split, n) order (slot 0 of the counters: the
    # per-sample ones are all back at zero by the time this kernel runs). d attn_bias is the sum
    # over pixels of the logits' gradient, 0 per sample up to rounding (a constant added to every
    # logit leaves the softmax unchanged): exactly 0, NaN where a d attn_weight is not finite
    # (as eager's sum, whose NaN would show there too).
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr, 1) == N * splits - 1:
        tl.store(ticket_ptr, 0)
        zero_or_nan = tl.zeros([BLOCK_K], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_mask = c < C
            dw = tl.zeros([BLOCK_K], dtype=acc_ty)
            for part in range(splits * N):
                dw += tl.load(dw_part + part * C + c, mask=c_mask, other=0, cache_modifier=".cg")
            tl.store(datt_w_ptr + c * datt_w_stride, dw.to(datt_w_ptr.dtype.element_ty), mask=c_mask)
            zero_or_nan += 0 * dw
        if HAS_ATT_BIAS:
            tl.store(datt_b_ptr, tl.sum(zero_or_nan, axis=0).to(datt_b_ptr.dtype.element_ty))


# ---- launchers --------------------------------------------------------------------------------

class GcPlan(NamedTuple):
    """Everything a launch needs that depends only on the shapes, dtype, layout and device."""
    grid: tuple           # (N, splits)
    hw_per_split: int
    block_c: int
    block_hw: int
    block_k: int
    block_r: int
    warps: int
    acc: torch.dtype
    forward_size: int     # the forward's workspace
    scale_at: int         # the backward's workspace: the scale's per-sample terms,
    add_at: int           # the add's,
    dw_at: int            # d attn_weight's partials,
    backward_size: int    # and its size
    weight_programs: int  # the weight-gradient kernel's grid


_plans = {}


def _plan(x: torch.Tensor, att: bool, r_scale: int, r_add: int) -> GcPlan:
    """attention_pool's tile and split of H*W, the transforms' chunks and the workspaces' layout,
    cached per shape, strides, dtype and device (with the tuning knobs tests turn). r_scale and
    r_add: the transforms' hidden widths, 0 for an absent one."""
    key = (*x.shape, *x.stride(), x.dtype, x.device, att, r_scale, r_add, channel_gate.TARGET_PROGRAMS_PER_SM,
           _attention_pool._TILE_ELEMENTS)
    plan = _plans.get(key)
    if plan is None:
        N, C = x.shape[:2]
        block_c, block_hw = tile_shape(x)
        _, splits, per_split = split_hw(x, C, block_hw)  # every channel in each program
        block_k = min(next_power_of_2(C), 64)
        block_r = min(next_power_of_2(max(r_scale, r_add, 1)), 64)
        partials = (splits * N * C + 2 * splits * N) if att else splits * N * C
        scale_at = 2 * N * C + 2 * splits * N * C
        add_at = scale_at + (_TERMS_R * N * r_scale + N * C if r_scale else 0)
        dw_at = add_at + (_TERMS_R * N * r_add + N * C if r_add else 0)
        weight_programs = sum((2 * cdiv(C, block_k) + 1) * cdiv(r, block_r) for r in (r_scale, r_add) if r)
        plan = GcPlan((N, splits), per_split, block_c, block_hw, block_k, block_r,
                      program_warps(block_c, block_hw, x.dtype), acc_dtype(x.dtype),
                      2 * N * C + partials + N * (r_scale + r_add), scale_at, add_at, dw_at,
                      dw_at + (splits * N * C if att else 0), weight_programs)
        _plans[key] = plan
    return plan


def _transform_args(x, weights):
    """(the six pointer arguments, R, eps-free scalars (w1 s0, s1, w2 s0, s1, LayerNorm stride))
    of a transform [fc1_weight, fc1_bias, ln_weight, ln_bias, fc2_weight, fc2_bias]; x stands in
    for the tensors of an absent one."""
    if not weights:
        return (x,) * 6, 0, (0, 0, 0, 0, 0)
    w1, _, ln_w, _, w2, _ = weights
    return tuple(weights), w1.shape[0], (*w1.stride()[:2], *w2.stride()[:2], ln_w.stride(0))


def _empty_grads(weights):
    return [torch.empty_like(w) for w in weights]


def gc_pool_transform(x, attn_weight, attn_bias, scale, add, scale_eps: float, add_eps: float, act: str,
                      gate: str):
    """(planes, context (N, C), lse (N,; (0,) for 'avg')): the gate and the add term in the
    first two (N, C) planes of a workspace (the apply reads them), the context and the logits'
    log-sum-exp for the backward. scale and add: a transform's six tensors (ops/gc.py), [] for an
    absent one; attn_weight None for 'avg'. Checked by the caller."""
    N, C, H, W = x.shape
    att = attn_weight is not None
    acc = acc_dtype(x.dtype)
    context = x.new_empty((N, C), dtype=acc)
    lse = x.new_empty((N,) if att else (0,), dtype=acc)
    scale_ptrs, r_scale, scale_strides = _transform_args(x, scale)
    add_ptrs, r_add, add_strides = _transform_args(x, add)
    if x.numel() == 0:
        return x.new_empty((2 * N * C,), dtype=acc), context.zero_(), lse.zero_()
    plan = _plan(x, att, r_scale, r_add)
    ws = x.new_empty((plan.forward_size,), dtype=acc)
    with device_guard(x):
        launch(_pool_transform_kernel, plan.grid,
               (x, attn_weight if att else x, attn_bias if attn_bias is not None else x, context,
                lse if att else context, ws, _tickets_for(x.device, N), *scale_ptrs, *add_ptrs),
               (N, C, H * W, *strides(x), plan.hw_per_split, plan.grid[1], attn_weight.stride(1) if att else 0,
                r_scale, r_add, scale_eps, add_eps, *scale_strides, *add_strides),
               dict(ATT=att, HAS_ATT_BIAS=attn_bias is not None, HAS_SCALE=bool(scale), HAS_ADD=bool(add),
                    ACT=ACT_CODES[act], GATE=ACT_CODES[gate], BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw,
                    BLOCK_K=plan.block_k, BLOCK_R=plan.block_r), plan.warps)
    return ws, context, lse


def gc_apply(x, planes, has_add: bool):
    """y = x * gate + add from gc_pool_transform's planes (the gate alone without the add term)."""
    return launch_gate_apply(x, planes, planes if has_add else None, stat_plane=x.shape[0] * x.shape[1])


def gc_grad_transform(dy, x, context, lse, attn_weight, attn_bias, scale, add, scale_eps: float, add_eps: float,
                      act: str, gate: str):
    """(dx, d attn_weight, d attn_bias, d scale, d add): the gradients in their weights' shapes
    and dtypes, None for an absent attention weight or bias, [] for an absent transform. dy in
    x's layout, checked by the caller."""
    N, C, H, W = x.shape
    att = attn_weight is not None
    dscale, dadd = _empty_grads(scale), _empty_grads(add)
    datt_w = torch.empty_like(attn_weight) if att else None
    datt_b = torch.empty_like(attn_bias) if attn_bias is not None else None
    if x.numel() == 0:
        for g in (*dscale, *dadd, datt_w, datt_b):  # an empty batch sums nothing
            if g is not None:
                g.zero_()
        return torch.empty_like(dy), datt_w, datt_b, dscale, dadd
    scale_ptrs, r_scale, scale_strides = _transform_args(x, scale)
    add_ptrs, r_add, add_strides = _transform_args(x, add)
    plan = _plan(x, att, r_scale, r_add)
    ws = x.new_empty((plan.backward_size,), dtype=plan.acc)
    tickets = _tickets_for(x.device, N)
    scale_grads = dscale if scale else (ws,) * 6
    add_grads = dadd if add else (ws,) * 6
    with device_guard(x):
        launch(_grad_transform_kernel, plan.grid,
               (dy, x, context, ws, tickets, *scale_ptrs, *add_ptrs),
               (N, C, H * W, *strides(x), plan.hw_per_split, plan.grid[1], r_scale, r_add, scale_eps, add_eps,
                plan.scale_at, plan.add_at, *scale_strides, *add_strides),
               dict(ATT=att, HAS_SCALE=bool(scale), HAS_ADD=bool(add), ACT=ACT_CODES[act], GATE=ACT_CODES[gate],
                    BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, BLOCK_K=plan.block_k, BLOCK_R=plan.block_r),
               plan.warps)
        launch(_weight_grad_kernel, (plan.weight_programs,), (context, ws, *scale_grads, *add_grads),
               (N, C, r_scale, r_add, plan.scale_at, plan.add_at, *_grad_strides(scale_grads, scale),
                *_grad_strides(add_grads, add)),
               dict(HAS_SCALE=bool(scale), BLOCK_K=plan.block_k, BLOCK_R=plan.block_r), 4)
        if att:
            dx = torch.empty_like(dy)
            launch(_attention_backward_kernel, plan.grid,
                   (dy, x, context, lse, ws, attn_weight, attn_bias if attn_bias is not None else ws, dx, datt_w,
                    datt_b if datt_b is not None else ws, tickets),
                   (N, C, H * W, *strides(x), plan.hw_per_split, plan.grid[1], attn_weight.stride(1),
                    datt_w.stride(1), plan.dw_at),
                   dict(HAS_SCALE=bool(scale), HAS_ATT_BIAS=attn_bias is not None, BLOCK_C=plan.block_c,
                        BLOCK_HW=plan.block_hw, BLOCK_K=plan.block_k), plan.warps)
        else:
            dx = launch_gate_apply(dy, ws, ws, stat_plane=N * C)
    return dx, datt_w, datt_b, dscale, dadd


def _grad_strides(grads, weights):
    """(d w1 s0, s1, d w2 s0, s1, d LayerNorm stride) of a transform's gradients, zeros when absent."""
    if not weights:
        return 0, 0, 0, 0, 0
    return (*grads[0].stride()[:2], *grads[4].stride()[:2], grads[2].stride(0))
