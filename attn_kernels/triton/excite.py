"""The channel-gate blocks (SE, ECA, CECA, CBAM's channel half) in Triton, their per-sample math in
the kernels: a forward of 2 launches, a backward of 3.

  pool_excite(x, w1, b1, w2, b2, cfg) -> (gate, mean, max)         1 launch, one read of x
      the H*W reduction of x; the last program of each sample folds the split partials in a fixed
      order and computes the gate from the pooled vector (the MLP or the channel conv, the
      activation, the gate) into the first (N, C) plane of its workspace
  grad_excite(dy, x, w1, b1, w2, b2, mean, max, cfg)
      -> (stats, weight gradients)                                      2 launches, one read of dy, x
      sum over H*W of dy*x (and the ties of the max); the last program of each sample recomputes
      the gate, differentiates the excitation by hand, and writes the gate, the bias
      d mean / HW and the tie coefficient d max / ties into the first three (N, C) planes of its
      workspace, and per sample dz and dh; then a kernel sums the per-sample terms of every
      weight gradient over N in a fixed order
  gate apply (channel_gate.launch_gate_apply)                           1 launch
      y = x*gate (forward); dx = dy*gate + bias + (x == max)*tie (backward)

"Last program of each sample": every reduction program takes a ticket from a per-sample counter
(an atomic add) after writing its partials; the one that draws the last ticket sees all partials
of its sample, computes, and resets the counter to 0 for the next launch. No float atomics, no
host synchronization, bitwise reproducible; the counters live in a buffer per device that the
kernels leave zeroed, so a launch can be captured in a CUDA graph. Kernels of this file must not
run on two streams of one device at once (they would share the counters).

The pooled statistics, the hidden layer and every per-sample gradient are in the accumulator
dtype (float32; float64 for float64 x); weights are read in their own dtype and their gradients
written in it.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from . import channel_gate
from .channel_gate import (
    cdiv, device_guard, nan_max, nan_maximum, next_power_of_2, split_hw, strides, tile_shape, tile_warps,
)
from .launch import launch

# Codes of the compile-time choices (constexpr ints), in the order of ops/excite.py's names.
POOL_CODES = {"avg": 0, "mix": 1, "avg+max": 2, "max": 3}
MIX_CODES = {"mlp": 0, "conv": 1, "circular_conv": 2}
ACT_CODES = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "tanh": 5, "sigmoid": 6,
             "hard_sigmoid": 7, "hard_swish": 8}
# Globals a kernel reads must be constexprs (the interpreter takes any; a compile refuses others).
_ONE_SIXTH = tl.constexpr(float(torch.tensor(1 / 6, dtype=torch.float32)))  # as PyTorch's hardsigmoid backward
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# ---- activations, as attn_kernels.activations computes them (NaN and inf included) -------------

@triton.jit
def _tanh(h):
    """tanh to the dtype's precision: Cephes' rational approximation below |h| = 0.625 (where
    1 - 2/(exp(2h) + 1) would cancel), that formula above."""
    a = tl.abs(h)
    z = h * h
    p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3
    q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3
    small = h + h * z * p / q
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    large = tl.where(h < 0, -large, large)
    return tl.where(a < 0.625, small, large)


@triton.jit
def _sigmoid(h):
    return 1.0 / (1.0 + tl.exp(-h))


@triton.jit
def _activation(h, ACT: tl.constexpr):
    # Selects rather than clamps, so NaN passes through as torch's clamps let it.
    if ACT == 0:
        out = h
    elif ACT == 1:
        out = tl.where(h <= 0, 0.0, h)
    elif ACT == 2:
        out = tl.where(h <= 0, 0.0, tl.where(h >= 6, 6.0, h))
    elif ACT == 3:
        out = h / (1.0 + tl.exp(-h))
    elif ACT == 4:
        out = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))
    elif ACT == 5:
        out = _tanh(h)
    elif ACT == 6:
        out = _sigmoid(h)
    else:
        s = h + 3.0
        r6 = tl.where(s <= 0, 0.0, tl.where(s >= 6, 6.0, s))
        if ACT == 7:
            out = r6 / 6.0
        else:
            out = h * r6 / 6.0
    return out.to(h.dtype)


@triton.jit
def _activation_backward(grad, h, ACT: tl.constexpr):
    """d loss / dh from d loss / d act(h), with PyTorch's choices at kinks and for NaN h."""
    if ACT == 0:
        out = grad
    elif ACT == 1:
        out = tl.where(h <= 0, 0.0, grad)
    elif ACT == 2:
        out = tl.where((h <= 0) | (h >= 6), 0.0, grad)
    elif ACT == 3:
        s = _sigmoid(h)
        out = grad * (s * (1.0 + h * (1.0 - s)))
    elif ACT == 4:
        out = grad * (0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI)
    elif ACT == 5:
        t = _tanh(h)
        out = grad * (1.0 - t * t)
    elif ACT == 6:
        s = _sigmoid(h)
        out = grad * (s * (1.0 - s))
    elif ACT == 7:
        out = tl.where((h > -3) & (h < 3), grad * _ONE_SIXTH, 0.0)
    else:
        out = tl.where(h <= -3, 0.0, tl.where(h < 3, grad * (h / 3.0 + 0.5), grad))
    return out.to(grad.dtype)


# ---- the pooled vectors and the mixers, for one sample --------------------------------------

@triton.jit
def _pooled(mean_ptr, max_ptr, offs, mask, POOL: tl.constexpr, BRANCH: tl.constexpr):
    """The pooled vector branch BRANCH reads: mean, max, their average ('mix'), or for 'avg+max'
    mean (branch 0) and max (branch 1)."""
    if POOL == 0:
        p = tl.load(mean_ptr + offs, mask=mask, other=0)
    elif POOL == 3:
        p = tl.load(max_ptr + offs, mask=mask, other=0)
    elif POOL == 1:
        p = 0.5 * tl.load(mean_ptr + offs, mask=mask, other=0) + 0.5 * tl.load(max_ptr + offs, mask=mask, other=0)
    elif BRANCH == 0:
        p = tl.load(mean_ptr + offs, mask=mask, other=0)
    else:
        p = tl.load(max_ptr + offs, mask=mask, other=0)
    return p


@triton.jit
def _fold_chunk(part_ptr, n, c, c_mask, N, C, splits, MAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """The partials of sample n at channels c over the splits, summed or maxed in split order.
    Loaded from L2 (.cg): other programs wrote them."""
    if MAX:
        acc = tl.full([BLOCK_K], float("-inf"), dtype=part_ptr.dtype.element_ty)
    else:
        acc = tl.zeros([BLOCK_K], dtype=part_ptr.dtype.element_ty)
    for split in range(splits):
        part = tl.load(part_ptr + split * N * C + n * C + c, mask=c_mask, other=0, cache_modifier=".cg")
        if MAX:
            acc = nan_maximum(acc, part)
        else:
            acc += part
    return acc


@triton.jit
def _fold_partials(part_ptr, out_ptr, n, N, C, splits, HW, MAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, :] = the partials of sample n folded: their max, or their sum / HW (the mean)."""
    for c0 in range(0, C, BLOCK_K):
        c = c0 + tl.arange(0, BLOCK_K)
        mask = c < C
        acc = _fold_chunk(part_ptr, n, c, mask, N, C, splits, MAX, BLOCK_K)
        if not MAX:
            acc = acc / HW
        tl.store(out_ptr + n * C + c, acc, mask=mask)


@triton.jit
def _mlp_hidden(mean_ptr, max_ptr, w1_ptr, b1_ptr, hid_ptr, n, C, R, w1_s0, w1_s1,
                POOL: tl.constexpr, BRANCHES: tl.constexpr, HAS_B1: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """hid[n, b, :] = W1 p_b + b1 for each branch b (before the activation)."""
    acc_ty = hid_ptr.dtype.element_ty
    row = n * C
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < R
        h0 = tl.zeros([BLOCK_R], dtype=acc_ty)
        h1 = tl.zeros([BLOCK_R], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            c_mask = c < C
            w = tl.load(w1_ptr + r[:, None] * w1_s0 + c[None, :] * w1_s1, mask=r_mask[:, None] & c_mask[None, :],
                        other=0).to(acc_ty)
            h0 += tl.sum(w * _pooled(mean_ptr, max_ptr, row + c, c_mask, POOL, 0)[None, :], axis=1)
            if BRANCHES == 2:
                h1 += tl.sum(w * _pooled(mean_ptr, max_ptr, row + c, c_mask, POOL, 1)[None, :], axis=1)
        if HAS_B1:
            b1 = tl.load(b1_ptr + r, mask=r_mask, other=0).to(acc_ty)
            h0 += b1
            h1 += b1
        tl.store(hid_ptr + (n * BRANCHES) * R + r, h0, mask=r_mask)
        if BRANCHES == 2:
            tl.store(hid_ptr + (n * BRANCHES + 1) * R + r, h1, mask=r_mask)


@triton.jit
def _mlp_logits(mean_ptr, max_ptr, hid_ptr, w2_ptr, b2_ptr, n, c, c_mask, C, R, w2_s0, w2_s1,
                POOL: tl.constexpr, BRANCHES: tl.constexpr, HAS_FC1: tl.constexpr, ACT: tl.constexpr,
                HAS_B2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """z[c] = sum over branches of (W2 h_b + b2)[c], h_b = act(hid[n, b]); without fc1 h_b = p_b
    (W2 is then (C, C)). R is the width W2 reads: rd_channels, or C without fc1."""
    acc_ty = hid_ptr.dtype.element_ty
    z = tl.zeros([BLOCK_K], dtype=acc_ty)
    for b in tl.static_range(BRANCHES):
        zb = tl.zeros([BLOCK_K], dtype=acc_ty)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_mask = r < R
            w = tl.load(w2_ptr + c[:, None] * w2_s0 + r[None, :] * w2_s1, mask=c_mask[:, None] & r_mask[None, :],
                        other=0).to(acc_ty)
            if HAS_FC1:
                h = _activation(tl.load(hid_ptr + (n * BRANCHES + b) * R + r, mask=r_mask, other=0), ACT)
                h = tl.where(r_mask, h, 0.0)
            else:
                h = _pooled(mean_ptr, max_ptr, n * R + r, r_mask, POOL, b)
            zb += tl.sum(w * h[None, :], axis=1)
        if HAS_B2:
            zb += tl.load(b2_ptr + c, mask=c_mask, other=0).to(acc_ty)
        z += zb
    return z


@triton.jit
def _conv_source(c, c_mask, j, PAD, C, CIRCULAR: tl.constexpr):
    """(channel, valid) that tap j of the channel conv reads for output channel c: zero padded,
    or wrapped around with circular padding."""
    src = c + j - PAD
    if CIRCULAR:
        src = (src + C) % C
        valid = c_mask
    else:
        valid = c_mask & (src >= 0) & (src < C)
    return src, valid


@triton.jit
def _conv_hidden(row_ptr, w1_ptr, b1_ptr, src, valid, r, w1_s0,
                 HAS_FC1: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr):
    """(h, h_pre) of hidden map r at channels src of a sample whose pooled row is row_ptr:
    act(w1[r] p + b1[r]), or p without fc1; h is 0 where not valid (the conv's zero padding)."""
    p = tl.load(row_ptr + src, mask=valid, other=0)
    if HAS_FC1:
        h_pre = tl.load(w1_ptr + r * w1_s0).to(p.dtype) * p
        if HAS_B1:
            h_pre += tl.load(b1_ptr + r).to(p.dtype)
        h = tl.where(valid, _activation(h_pre, ACT), 0.0)
    else:
        h_pre = p
        h = p
    return h, h_pre


@triton.jit
def _conv_logits(row_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, c, c_mask, C, R, K, w1_s0, w2_s1, w2_s2,
                 CIRCULAR: tl.constexpr, HAS_FC1: tl.constexpr, HAS_B1: tl.constexpr, ACT: tl.constexpr,
                 HAS_B2: tl.constexpr, BLOCK_K: tl.constexpr):
    """z[c] = b2 + sum over maps r and taps j of w2[r, j] h_r[c + j - K//2]."""
    z = tl.zeros([BLOCK_K], dtype=row_ptr.dtype.element_ty)
    for r in range(R):
        for j in range(K):
            src, valid = _conv_source(c, c_mask, j, K // 2, C, CIRCULAR)
            h, _ = _conv_hidden(row_ptr, w1_ptr, b1_ptr, src, valid, r, w1_s0, HAS_FC1, HAS_B1, ACT)
            z += tl.load(w2_ptr + r * w2_s1 + j * w2_s2).to(z.dtype) * h
    if HAS_B2:
        z += tl.load(b2_ptr).to(z.dtype)
    return z


@triton.jit
def _excite_gate(n, mean_ptr, max_ptr, gate_ptr, hid_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, C, R, K,
                 w1_s0, w1_s1, w2_s0, w2_s1, w2_s2, POOL: tl.constexpr, MIX: tl.constexpr, ACT: tl.constexpr,
                 GATE: tl.constexpr, HAS_FC1: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """gate[n, :] = gate(mix(p)) from sample n's pooled statistics, which this program wrote
    (behind a barrier); the MLP's hidden layer goes through hid (N, branches, R)."""
    BRANCHES: tl.constexpr = 2 if POOL == 2 else 1
    if MIX == 0 and HAS_FC1:
        _mlp_hidden(mean_ptr, max_ptr, w1_ptr, b1_ptr, hid_ptr, n, C, R, w1_s0, w1_s1, POOL, BRANCHES, HAS_B1,
                    BLOCK_K, BLOCK_R)
        tl.debug_barrier()
    for c0 in range(0, C, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        if MIX == 0:
            z = _mlp_logits(mean_ptr, max_ptr, hid_ptr, w2_ptr, b2_ptr, n, k, k_mask, C, R, w2_s0, w2_s1, POOL,
                            BRANCHES, HAS_FC1, ACT, HAS_B2, BLOCK_K, BLOCK_R)
        else:
            z = _conv_logits(mean_ptr + n * C, w1_ptr, b1_ptr, w2_ptr, b2_ptr, k, k_mask, C, R, K, w1_s0, w2_s1,
                             w2_s2, MIX == 2, HAS_FC1, HAS_B1, ACT, HAS_B2, BLOCK_K)
        tl.store(gate_ptr + n * C + k, _activation(z, GATE), mask=k_mask)


# ---- forward ----------------------------------------------------------------------------------

@triton.jit
def _pool_excite_kernel(
    x_ptr, mean_ptr, max_ptr, ws_ptr, ticket_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    N, C, HW, R, K, stride_n, stride_c, stride_hw, hw_per_split, splits, w1_s0, w1_s1, w2_s0, w2_s1, w2_s2,
    POOL: tl.constexpr, MIX: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, HAS_FC1: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (n, channel tile, split of H*W): partial sum (and max) of its part of x.
    # The workspace starts with the gate (N, C), then the partials and the hidden layer.
    stats_ptr = ws_ptr
    ws_ptr += N * C
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = n * stride_n + c[:, None] * stride_c
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    acc_ty = mean_ptr.dtype.element_ty
    USES_MAX: tl.constexpr = POOL != 0
    total = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    best = tl.full((BLOCK_C, BLOCK_HW), float("-inf"), dtype=acc_ty)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < hw_end)[None, :]
        a = tl.load(x_ptr + base + hw[None, :] * stride_hw, mask=mask, other=0).to(acc_ty)
        total += a
        if USES_MAX:
            best = nan_maximum(best, tl.where(mask, a, float("-inf")))
    part = split * N * C + n * C + c
    tl.store(ws_ptr + part, tl.sum(total, axis=1), mask=c_mask)
    if USES_MAX:
        tl.store(ws_ptr + splits * N * C + part, nan_max(best, 1), mask=c_mask)

    # The last program of sample n folds the partials and computes its gate.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + n, 1) == c_tiles * splits - 1:
        tl.store(ticket_ptr + n, 0)
        _fold_partials(ws_ptr, mean_ptr, n, N, C, splits, HW, False, BLOCK_K)
        if USES_MAX:
            _fold_partials(ws_ptr + splits * N * C, max_ptr, n, N, C, splits, HW, True, BLOCK_K)
        tl.debug_barrier()
        _excite_gate(n, mean_ptr, max_ptr, stats_ptr, ws_ptr + (2 if USES_MAX else 1) * splits * N * C, w1_ptr,
                     b1_ptr, w2_ptr, b2_ptr, C, R, K, w1_s0, w1_s1, w2_s0, w2_s1, w2_s2, POOL, MIX, ACT, GATE,
                     HAS_FC1, HAS_B1, HAS_B2, BLOCK_K, BLOCK_R)


# ---- backward ---------------------------------------------------------------------------------

@triton.jit
def _store_bias_and_tie(stats_ptr, ties_ptr, max_ptr, n, c, c_mask, N, C, HW, splits, dp0, dp1,
                        POOL: tl.constexpr, BLOCK_K: tl.constexpr):
    """From d loss / d p_b at channels c: bias = d mean / HW into stats[1] and, where the max is
    pooled, tie = d max / ties into stats[2]; amax's gradient is shared equally by tied maxima,
    and a NaN max (which no element equals) makes the bias NaN, as eager's gradient is."""
    row = n * C + c
    if POOL == 0:
        bias = dp0 / HW
    else:
        if POOL == 1:
            dmean = 0.5 * dp0
            dmax = 0.5 * dp0
        elif POOL == 2:
            dmean = dp0
            dmax = dp1
        else:
            dmean = tl.zeros([BLOCK_K], dtype=dp0.dtype)
            dmax = dp0
        xmax = tl.load(max_ptr + row, mask=c_mask, other=0)
        bias = tl.where(xmax != xmax, float("nan"), dmean / HW)
        ties = _fold_chunk(ties_ptr, n, c, c_mask, N, C, splits, False, BLOCK_K)
        tl.store(stats_ptr + 2 * N * C + row, dmax / tl.where(c_mask, ties, 1.0), mask=c_mask)
    tl.store(stats_ptr + N * C + row, bias, mask=c_mask)


@triton.jit
def _excite_backward(n, mean_ptr, max_ptr, stats_ptr, part_ptr, ties_ptr, hid_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                     N, C, HW, R, K, splits, w1_s0, w1_s1, w2_s0, w2_s1, w2_s2,
                     POOL: tl.constexpr, MIX: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr,
                     HAS_FC1: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Sample n's excitation differentiated, from the split partials of d loss / d gate (and of the
    max's ties) in part and ties: gate, bias and tie into stats' planes 0, 1, 2 (N, C); hid
    (N, branches, R), then dz (N, C) and dh (N, R; N, R, C for the channel conv) for the weight
    gradients."""
    BRANCHES: tl.constexpr = 2 if POOL == 2 else 1
    acc_ty = mean_ptr.dtype.element_ty
    if MIX == 0 and HAS_FC1:
        dz_ptr = hid_ptr + N * BRANCHES * R
        _mlp_hidden(mean_ptr, max_ptr, w1_ptr, b1_ptr, hid_ptr, n, C, R, w1_s0, w1_s1, POOL, BRANCHES, HAS_B1,
                    BLOCK_K, BLOCK_R)
        tl.debug_barrier()
    else:
        dz_ptr = hid_ptr
    dh_ptr = dz_ptr + N * C
    # The gate, and dz = d loss / d logits.
    for c0 in range(0, C, BLOCK_K):
        k = c0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        if MIX == 0:
            z = _mlp_logits(mean_ptr, max_ptr, hid_ptr, w2_ptr, b2_ptr, n, k, k_mask, C, R, w2_s0, w2_s1, POOL,
                            BRANCHES, HAS_FC1, ACT, HAS_B2, BLOCK_K, BLOCK_R)
        else:
            z = _conv_logits(mean_ptr + n * C, w1_ptr, b1_ptr, w2_ptr, b2_ptr, k, k_mask, C, R, K, w1_s0, w2_s1,
                             w2_s2, MIX == 2, HAS_FC1, HAS_B1, ACT, HAS_B2, BLOCK_K)
        tl.store(stats_ptr + n * C + k, _activation(z, GATE), mask=k_mask)
        dgate = _fold_chunk(part_ptr, n, k, k_mask, N, C, splits, False, BLOCK_K)
        tl.store(dz_ptr + n * C + k, _activation_backward(dgate, z, GATE), mask=k_mask)
    tl.debug_barrier()
    if MIX == 0:
        # dh = W2^T dz over the width W2 reads (rd_channels; C without fc1), the same for
        # every branch; then d p_b = W1^T act'(h_b) dh, or dh itself without fc1.
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            r_mask = r < R
            dh = tl.zeros([BLOCK_R], dtype=acc_ty)
            for c0 in range(0, C, BLOCK_K):
                k = c0 + tl.arange(0, BLOCK_K)
                k_mask = k < C
                w = tl.load(w2_ptr + k[:, None] * w2_s0 + r[None, :] * w2_s1,
                            mask=k_mask[:, None] & r_mask[None, :], other=0).to(acc_ty)
                dz = tl.load(dz_ptr + n * C + k, mask=k_mask, other=0)
                dh += tl.sum(w * dz[:, None], axis=0)
            tl.store(dh_ptr + n * R + r, dh, mask=r_mask)
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_K):
            k = c0 + tl.arange(0, BLOCK_K)
            k_mask = k < C
            if HAS_FC1:
                dp0 = tl.zeros([BLOCK_K], dtype=acc_ty)
                dp1 = tl.zeros([BLOCK_K], dtype=acc_ty)
                for r0 in range(0, R, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    r_mask = r < R
                    w = tl.load(w1_ptr + r[:, None] * w1_s0 + k[None, :] * w1_s1,
                                mask=r_mask[:, None] & k_mask[None, :], other=0).to(acc_ty)
                    dh = tl.load(dh_ptr + n * R + r, mask=r_mask, other=0)
                    h0 = tl.load(hid_ptr + (n * BRANCHES) * R + r, mask=r_mask, other=0)
                    dp0 += tl.sum(w * _activation_backward(dh, h0, ACT)[:, None], axis=0)
                    if BRANCHES == 2:
                        h1 = tl.load(hid_ptr + (n * BRANCHES + 1) * R + r, mask=r_mask, other=0)
                        dp1 += tl.sum(w * _activation_backward(dh, h1, ACT)[:, None], axis=0)
            else:
                dp0 = tl.load(dh_ptr + n * C + k, mask=k_mask, other=0)
                dp1 = dp0
            _store_bias_and_tie(stats_ptr, ties_ptr, max_ptr, n, k, k_mask, N, C, HW, splits, dp0, dp1, POOL,
                                BLOCK_K)
    else:
        # The channel conv's transpose: dh_r[c] = sum over taps j of w2[r, j] dz[c - j + K//2];
        # with fc1 the maps' gradients dh_pre (N, R, C) are kept for w1's gradient.
        for c0 in range(0, C, BLOCK_K):
            k = c0 + tl.arange(0, BLOCK_K)
            k_mask = k < C
            dp = tl.zeros([BLOCK_K], dtype=acc_ty)
            for r in range(R):
                dh = tl.zeros([BLOCK_K], dtype=acc_ty)
                for j in range(K):
                    src, valid = _conv_source(k, k_mask, -j, -(K // 2), C, MIX == 2)
                    dh += tl.load(w2_ptr + r * w2_s1 + j * w2_s2).to(acc_ty) * tl.load(
                        dz_ptr + n * C + src, mask=valid, other=0)
                if HAS_FC1:
                    _, h_pre = _conv_hidden(mean_ptr + n * C, w1_ptr, b1_ptr, k, k_mask, r, w1_s0, HAS_FC1, HAS_B1,
                                            ACT)
                    dh = _activation_backward(dh, h_pre, ACT)
                    tl.store(dh_ptr + (n * R + r) * C + k, dh, mask=k_mask)
                    dp += tl.load(w1_ptr + r * w1_s0).to(acc_ty) * dh
                else:
                    dp = dh
            _store_bias_and_tie(stats_ptr, ties_ptr, max_ptr, n, k, k_mask, N, C, HW, splits, dp, dp, POOL,
                                BLOCK_K)



@triton.jit
def _grad_excite_kernel(
    dy_ptr, x_ptr, mean_ptr, max_ptr, ws_ptr, ticket_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    N, C, HW, R, K, stride_n, stride_c, stride_hw, hw_per_split, splits, w1_s0, w1_s1, w2_s0, w2_s1, w2_s2,
    POOL: tl.constexpr, MIX: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, HAS_FC1: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (n, channel tile, split of H*W): partial sum of dy*x (d loss / d gate) and
    # the count of x equal to the max. The workspace starts with gate, bias and tie (3, N, C),
    # then the partials, the hidden layer, dz and dh.
    stats_ptr = ws_ptr
    ws_ptr += 3 * N * C
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = n * stride_n + c[:, None] * stride_c
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    acc_ty = mean_ptr.dtype.element_ty
    USES_MAX: tl.constexpr = POOL != 0
    dot = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    ties = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    if USES_MAX:
        ref = tl.load(max_ptr + n * C + c, mask=c_mask, other=0)[:, None]
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < hw_end)[None, :]
        offsets = base + hw[None, :] * stride_hw
        g = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty)
        a = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
        dot += g * a
        if USES_MAX:
            ties += tl.where(mask & (a == ref), 1.0, 0.0).to(acc_ty)
    part = split * N * C + n * C + c
    tl.store(ws_ptr + part, tl.sum(dot, axis=1), mask=c_mask)
    if USES_MAX:
        tl.store(ws_ptr + splits * N * C + part, tl.sum(ties, axis=1), mask=c_mask)

    # The last program of sample n differentiates its excitation.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr + n, 1) == c_tiles * splits - 1:
        tl.store(ticket_ptr + n, 0)
        _excite_backward(n, mean_ptr, max_ptr, stats_ptr, ws_ptr, ws_ptr + splits * N * C,
                         ws_ptr + (2 if USES_MAX else 1) * splits * N * C, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                         N, C, HW, R, K, splits, w1_s0, w1_s1, w2_s0, w2_s1, w2_s2, POOL, MIX, ACT, GATE,
                         HAS_FC1, HAS_B1, HAS_B2, BLOCK_K, BLOCK_R)


@triton.jit
def _mlp_weight_grad_kernel(
    mean_ptr, max_ptr, ws_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    hidden_at, dz_at, dh_at, N, C, R, dw1_s0, dw1_s1, dw2_s0, dw2_s1,
    POOL: tl.constexpr, ACT: tl.constexpr, HAS_FC1: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Programs first over the tiles of W2 (C, R), then over those of W1 (R, C); each sums its
    # tile's per-sample terms over n in order. R is the width W2 reads (C without fc1).
    pid = tl.program_id(0)
    BRANCHES: tl.constexpr = 2 if POOL == 2 else 1
    hid_ptr = ws_ptr + hidden_at
    dz_ptr = ws_ptr + dz_at
    dh_ptr = ws_ptr + dh_at
    acc_ty = ws_ptr.dtype.element_ty
    r_tiles = tl.cdiv(R, BLOCK_R)
    c_tiles = tl.cdiv(C, BLOCK_K)
    if pid < c_tiles * r_tiles:
        c = (pid // r_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        r = (pid % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        c_mask = c < C
        r_mask = r < R
        acc = tl.zeros([BLOCK_K, BLOCK_R], dtype=acc_ty)
        bias = tl.zeros([BLOCK_K], dtype=acc_ty)
        for n in range(N):
            dz = tl.load(dz_ptr + n * C + c, mask=c_mask, other=0)
            for b in tl.static_range(BRANCHES):
                if HAS_FC1:
                    h = _activation(tl.load(hid_ptr + (n * BRANCHES + b) * R + r, mask=r_mask, other=0), ACT)
                else:
                    h = _pooled(mean_ptr, max_ptr, n * C + r, r_mask, POOL, b)
                acc += dz[:, None] * h[None, :]
            bias += dz
        tl.store(dw2_ptr + c[:, None] * dw2_s0 + r[None, :] * dw2_s1, acc.to(dw2_ptr.dtype.element_ty),
                 mask=c_mask[:, None] & r_mask[None, :])
        if HAS_B2:
            if pid % r_tiles == 0:
                tl.store(db2_ptr + c, (bias * BRANCHES).to(db2_ptr.dtype.element_ty), mask=c_mask)
    else:
        # (names of their own: Triton types a variable alike in both branches of an if)
        tile = pid - c_tiles * r_tiles
        r = (tile // c_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = (tile % c_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
        c_mask = c < C
        r_mask = r < R
        acc_w1 = tl.zeros([BLOCK_R, BLOCK_K], dtype=acc_ty)
        bias_b1 = tl.zeros([BLOCK_R], dtype=acc_ty)
        for n in range(N):
            dh = tl.load(dh_ptr + n * R + r, mask=r_mask, other=0)
            for b in tl.static_range(BRANCHES):
                h_pre = tl.load(hid_ptr + (n * BRANCHES + b) * R + r, mask=r_mask, other=0)
                dh_pre = _activation_backward(dh, h_pre, ACT)
                acc_w1 += dh_pre[:, None] * _pooled(mean_ptr, max_ptr, n * C + c, c_mask, POOL, b)[None, :]
                bias_b1 += dh_pre
        tl.store(dw1_ptr + r[:, None] * dw1_s0 + c[None, :] * dw1_s1, acc_w1.to(dw1_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & c_mask[None, :])
        if HAS_B1:
            if tile % c_tiles == 0:
                tl.store(db1_ptr + r, bias_b1.to(db1_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _conv_weight_grad_kernel(
    mean_ptr, ws_ptr, w1_ptr, b1_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,
    dz_at, dh_at, N, C, R, K, w1_s0, dw1_s0, dw2_s1, dw2_s2,
    CIRCULAR: tl.constexpr, ACT: tl.constexpr, HAS_FC1: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Programs: one per tap (r, j) of w2, then (with fc1) one per map r of w1 and b1, then (with
    # b2) one for b2; each sums over n and C in order.
    pid = tl.program_id(0)
    dz_ptr = ws_ptr + dz_at
    dh_ptr = ws_ptr + dh_at
    acc_ty = ws_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_K], dtype=acc_ty)
    bias = tl.zeros([BLOCK_K], dtype=acc_ty)
    w1_programs = R if HAS_FC1 else 0
    if pid < R * K:
        r = pid // K
        j = pid % K
        for n in range(N):
            for c0 in range(0, C, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                c_mask = c < C
                src, valid = _conv_source(c, c_mask, j, K // 2, C, CIRCULAR)
                h, _ = _conv_hidden(mean_ptr + n * C, w1_ptr, b1_ptr, src, valid, r, w1_s0, HAS_FC1, HAS_B1, ACT)
                acc += tl.load(dz_ptr + n * C + c, mask=c_mask, other=0) * h
        tl.store(dw2_ptr + r * dw2_s1 + j * dw2_s2, tl.sum(acc, axis=0).to(dw2_ptr.dtype.element_ty))
    elif pid < R * K + w1_programs:
        r = pid - R * K
        for n in range(N):
            for c0 in range(0, C, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                c_mask = c < C
                dh_pre = tl.load(dh_ptr + (n * R + r) * C + c, mask=c_mask, other=0)
                acc += dh_pre * tl.load(mean_ptr + n * C + c, mask=c_mask, other=0)
                bias += dh_pre
        tl.store(dw1_ptr + r * dw1_s0, tl.sum(acc, axis=0).to(dw1_ptr.dtype.element_ty))
        if HAS_B1:
            tl.store(db1_ptr + r, tl.sum(bias, axis=0).to(db1_ptr.dtype.element_ty))
    else:
        for n in range(N):
            for c0 in range(0, C, BLOCK_K):
                c = c0 + tl.arange(0, BLOCK_K)
                bias += tl.load(dz_ptr + n * C + c, mask=c < C, other=0)
        tl.store(db2_ptr, tl.sum(bias, axis=0).to(db2_ptr.dtype.element_ty))


# ---- launchers --------------------------------------------------------------------------------

class ExcitePlan(NamedTuple):
    """Everything a launch needs that depends only on the shapes, dtype, layout and device."""
    grid: tuple              # the reduction's (programs, splits)
    hw_per_split: int
    block_c: int
    block_hw: int
    block_k: int
    block_r: int
    warps: int
    acc: torch.dtype


_plans = {}


def _plan(x: torch.Tensor, width: int) -> ExcitePlan:
    """The plan of a reduction over x whose excitation reads `width` hidden channels, cached
    (with the tuning knobs tests turn, so that turning them takes effect)."""
    key = (*x.shape, *x.stride(), x.dtype, x.device, width, channel_gate.TARGET_PROGRAMS_PER_SM,
           channel_gate._TILE_ELEMENTS)
    plan = _plans.get(key)
    if plan is None:
        block_c, block_hw = tile_shape(x)
        tiles, splits, per_split = split_hw(x, block_c, block_hw)
        # The per-sample math walks C in chunks of BLOCK_K and the hidden width in BLOCK_R.
        block_k = min(next_power_of_2(x.shape[1]), 64)
        block_r = min(next_power_of_2(max(width, 1)), 64)
        warps = tile_warps(max(block_c * block_hw, block_k * block_r), x.dtype)
        plan = ExcitePlan((tiles, splits), per_split, block_c, block_hw, block_k, block_r, warps, acc_dtype(x.dtype))
        _plans[key] = plan
    return plan


_tickets = {}


def _tickets_for(device: torch.device, samples: int) -> torch.Tensor:
    """The device's per-sample counters (zero between launches: the kernels reset them)."""
    tickets = _tickets.get(device)
    if tickets is None or tickets.numel() < samples:
        tickets = torch.zeros(max(samples, 1024), dtype=torch.int32, device=device)
        _tickets[device] = tickets
    return tickets


def _weights(w1, b1, w2, b2):
    """(pointer arguments, width W2 reads, taps, strides) of the weights, absent ones replaced by
    w2. An MLP's W1 (R, C) and W2 (C, R) as 1x1-conv or linear weights; a channel conv's w2
    (1, R, K) with w1 (R, 1, 1)."""
    if w2.dim() == 3:
        R, K = w2.shape[1], w2.shape[2]
        weight_strides = (w1.stride(0) if w1 is not None else 0, 0, 0, w2.stride(1), w2.stride(2))
    else:
        R, K = w2.shape[1], 1
        weight_strides = (*(w1.stride()[:2] if w1 is not None else (0, 0)), *w2.stride()[:2], 0)
    return tuple(t if t is not None else w2 for t in (w1, b1, w2, b2)), R, K, weight_strides


def _constexprs(cfg, w1, b1, b2, plan: ExcitePlan) -> dict:
    pool, mix, act, gate = cfg
    return dict(POOL=POOL_CODES[pool], MIX=MIX_CODES[mix], ACT=ACT_CODES[act], GATE=ACT_CODES[gate],
                HAS_FC1=w1 is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None, BLOCK_C=plan.block_c,
                BLOCK_HW=plan.block_hw, BLOCK_K=plan.block_k, BLOCK_R=plan.block_r)


def _workspace(x, plan: ExcitePlan, cfg, R: int, has_fc1: bool, backward: bool):
    """One flat buffer for everything a launch writes but the op does not return, laid out as the
    kernels lay it out: the (N, C) planes of the apply (forward: the gate; backward: gate, bias,
    tie), the reduction's partials, the hidden layer, and (backward) dz and dh. Returns it with the
    offsets of the hidden layer, dz and dh."""
    pool, mix = cfg[0], cfg[1]
    N, C = x.shape[:2]
    planes = 3 if backward else 1
    hidden_at = (planes + (1 if pool == "avg" else 2) * plan.grid[1]) * N * C
    branches = 2 if pool == "avg+max" else 1
    dz_at = hidden_at + (N * branches * R if mix == "mlp" and has_fc1 else 0)
    dh_at = dz_at + N * C
    end = (dh_at + (N * R if mix == "mlp" else N * R * C)) if backward else dz_at
    return x.new_empty((end,), dtype=plan.acc), hidden_at, dz_at, dh_at


def pool_excite(x, w1, b1, w2, b2, cfg):
    """(gate, mean, max): the gate in the first N*C elements of a workspace (the apply reads it
    there), the pooled statistics (max empty unless the pool uses it). cfg = (pool, mix, act,
    gate) as in ops/excite.py; x checked by the caller."""
    (pw1, pb1, pw2, pb2), R, K, weight_strides = _weights(w1, b1, w2, b2)
    N, C, H, W = x.shape
    uses_max = cfg[0] != "avg"
    acc = acc_dtype(x.dtype)
    mean = x.new_empty((N, C), dtype=acc)
    xmax = x.new_empty((N, C) if uses_max else (0,), dtype=acc)
    if x.numel() == 0:
        return x.new_empty((N, C), dtype=acc), mean.zero_(), xmax.zero_()
    plan = _plan(x, R)
    ws = _workspace(x, plan, cfg, R, w1 is not None, False)[0]
    with device_guard(x):
        launch(_pool_excite_kernel, plan.grid,
               (x, mean, xmax if uses_max else mean, ws, _tickets_for(x.device, N), pw1, pb1, pw2, pb2),
               (N, C, H * W, R, K, *strides(x), plan.hw_per_split, plan.grid[1], *weight_strides),
               _constexprs(cfg, w1, b1, b2, plan), plan.warps)
    return ws, mean, xmax


def grad_excite(dy, x, w1, b1, w2, b2, mean, xmax, cfg):
    """(stats, weight gradients): stats starts with the (N, C) planes gate, bias (d mean / HW) and
    tie (d max / ties) of dx = dy*gate + bias + (x == max)*tie; the gradients of w1, b1, w2, b2 in
    their shapes and dtypes (None for absent weights). dy in x's layout, checked by the caller."""
    (pw1, pb1, pw2, pb2), R, K, weight_strides = _weights(w1, b1, w2, b2)
    N, C, H, W = x.shape
    pool, mix = cfg[0], cfg[1]
    uses_max = pool != "avg"
    grads = [torch.empty_like(t) if t is not None else None for t in (w1, b1, w2, b2)]
    if x.numel() == 0:
        return x.new_empty((3, N, C), dtype=acc_dtype(x.dtype)), [g.zero_() if g is not None else None for g in grads]
    plan = _plan(x, R)
    ws, hidden_at, dz_at, dh_at = _workspace(x, plan, cfg, R, w1 is not None, True)
    constexprs = _constexprs(cfg, w1, b1, b2, plan)
    gw1, gb1, gw2, gb2 = (g if g is not None else ws for g in grads)
    with device_guard(x):
        launch(_grad_excite_kernel, plan.grid,
               (dy, x, mean, xmax if uses_max else mean, ws, _tickets_for(x.device, N), pw1, pb1, pw2, pb2),
               (N, C, H * W, R, K, *strides(x), plan.hw_per_split, plan.grid[1], *weight_strides),
               constexprs, plan.warps)
        flags = dict(HAS_FC1=w1 is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None)
        if mix == "mlp":
            tiles = cdiv(C, plan.block_k) * cdiv(R, plan.block_r) * (2 if w1 is not None else 1)
            launch(_mlp_weight_grad_kernel, (tiles,), (mean, xmax if uses_max else mean, ws, gw1, gb1, gw2, gb2),
                   (hidden_at, dz_at, dh_at, N, C, R, *(gw1.stride()[:2] if w1 is not None else (0, 0)),
                    *gw2.stride()[:2]), dict(POOL=constexprs["POOL"], ACT=constexprs["ACT"], **flags, BLOCK_K=plan.block_k,
                    BLOCK_R=plan.block_r), 4)
        else:
            programs = R * K + (R if w1 is not None else 0) + (1 if b2 is not None else 0)
            launch(_conv_weight_grad_kernel, (programs,), (mean, ws, pw1, pb1, gw1, gb1, gw2, gb2),
                   (dz_at, dh_at, N, C, R, K, weight_strides[0], gw1.stride(0) if w1 is not None else 0,
                    gw2.stride(1), gw2.stride(2)), dict(CIRCULAR=mix == "circular_conv", ACT=constexprs["ACT"], **flags, BLOCK_K=plan.block_k), 4)
    return ws, grads
