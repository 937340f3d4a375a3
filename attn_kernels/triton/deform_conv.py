"""Modulated deformable convolution (DCNv2, torchvision.ops.deform_conv2d) in Triton, as implicit
GEMMs that sample x bilinearly while loading their tiles: no im2col columns buffer (C*kh*kw*Hout*Wout
per image) is ever written, forward or backward.

  deform_conv2d(x, weight, offset, mask, bias, stride, padding, dilation) -> out
      out[n, o, p] = bias[o] + sum_{c, k} weight[o, c, k] * col[n, c, k, p],
      col[n, c, k, p] = mask[n, d*K + k, p] * bilinear(x[n, c], position of tap k at output pixel p
                        + offset[n, 2*(d*K + k) : 2*(d*K + k) + 2, p])      (d: c's offset group)
  deform_conv2d_backward(dy, x, weight, offset, mask, has_bias, ...) -> (dx, dweight, doffset, dmask, dbias)

Sampling is torchvision's (csrc/ops/cpu/deform_conv2d_kernel.cpp): a sample at (y, x) is zero unless
-1 < y < H and -1 < x < W, each of its four corners is read only where it lies inside the image,
and the offset gradient uses the corner values without that first test (get_coordinate_weight),
which makes it non-zero at exactly y = -1 or x = -1, as torchvision's.

Kernels (K = kh*kw taps, P = Hout*Wout output pixels, groups G, offset groups D):
- _forward_kernel: one program per (n, output-pixel tile, weight group, output-channel tile); the
  reduction over (c, k) in BLOCK_R steps, each sampling a [BLOCK_R, BLOCK_P] tile of col on chip
  and multiplying it into the [BLOCK_O, BLOCK_P] accumulator (tl.dot).
- _input_grads_kernel: one program per (n, offset group d, tap k, output-pixel tile). It loops over
  the channels of d, computing dcol = weight[:, c, k]^T dy for a [BLOCK_C, BLOCK_P] tile (tl.dot
  over the output channels of c's weight group), samples x at the tile's positions, and sums the
  offset and mask gradients over the channels on chip: each is written once, by plain stores.
  dx is scattered from there with float atomics (tl.atomic_add) into the corners within distance 1
  of the position, as torchvision's col2im (not a far corner at weight 0, where an infinite dy
  would leave 0 * inf = NaN), unless torch's deterministic mode is on (below).
- _input_grad_gather_kernel (deterministic mode): dx gathered instead of scattered. The launcher
  lists every (sample, corner) pair with its target pixel and weight (4*N*D*K*P entries: the size
  of the offset tensor times 2, not of the columns), sorts them by target pixel with a stable
  sort, and one program per (n, channel tile, pixel tile) sums, in that fixed order, the
  contributions of the samples that land on its pixels (up to the most any pixel of its tile
  gets), recomputing dcol for each from weight and dy. About 4x the GEMM's FLOPs, off the tensor cores: the price of determinism. torchvision's own
  backward (CUDA: atomicAdd in deformable_col2im_kernel) is nondeterministic and does not alert.
- _weight_grad_kernel: one program per (weight group, output-channel tile, (c, k) tile, split of
  the N*P pixels), dweight partials = dy @ col^T with col sampled on chip; the splits' partials are
  summed in a fixed order by torch (deterministic, no atomics). dbias = dy summed by torch.

The math runs in float32 (float64 for float64 x): sampling, accumulators, atomics (dx of 16-bit x
goes through a float32 buffer). The GEMM operands are the I/O dtype for float16/bfloat16 (tensor
cores, as the im2col path's columns buffer holds them), float32 with full IEEE precision (no
TF32), float64. x and dy are read through their strides (contiguous NCHW or channels_last, no
copy); out and dx take x's layout; weight, offset and mask are made contiguous (small). Offsets
into x, dy, out and dx are int64.
"""
import math

import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from .channel_gate import sm_count, device_guard

_PROGRAMS_PER_SM = 4  # the weight gradient splits its N*P pixels until the grid has this many per SM


@triton.jit
def _tap_position(off_ptr, n, d, k, p, valid, D, K, KW, P, Wout, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                  ACC: tl.constexpr):
    """(y, x, tap) of tap k at output pixels p for offset group d of sample n: the sampling position
    (torchvision's: the integer grid position plus the offset, in the accumulator dtype) and the
    index of (n, d, k) in the (N, D*K) channels of the mask (offset channels 2*tap, 2*tap + 1)."""
    tap = (n * D + d) * K + k
    off = off_ptr + 2 * tap * P + p
    off_y = tl.load(off, mask=valid, other=0).to(ACC)
    off_x = tl.load(off + P, mask=valid, other=0).to(ACC)
    ho = p // Wout
    wo = p - ho * Wout
    kh = k // KW
    kw = k - kh * KW
    y = (ho * stride_h - pad_h + kh * dil_h).to(ACC) + off_y
    x = (wo * stride_w - pad_w + kw * dil_w).to(ACC) + off_x
    return y, x, tap


@triton.jit
def _corners(x_ptr, plane, y, x, valid, H, W, sxh, sxw, ACC: tl.constexpr):
    """The four neighbours of (y, x) in the planes at x_ptr + plane, each zero where it lies outside
    the image, and the fractional parts (ly, lx) of y and x. Also the corners' offsets from plane
    and their in-image flags, for the scatter of dx."""
    # Clamped before the integer conversion (a far-away sample has no corner inside either way);
    # A NaN position stays NaN (compiled max/min would drop it), so its sample is NaN as torchvision's.
    y0 = tl.floor(tl.minimum(tl.maximum(y, -2.0, propagate_nan=tl.PropagateNan.ALL), H + 1.0,
                             propagate_nan=tl.PropagateNan.ALL))
    x0 = tl.floor(tl.minimum(tl.maximum(x, -2.0, propagate_nan=tl.PropagateNan.ALL), W + 1.0,
                             propagate_nan=tl.PropagateNan.ALL))
    ly = y - y0
    lx = x - x0
    yi = y0.to(tl.int32)
    xi = x0.to(tl.int32)
    ok_y0 = (yi >= 0) & (yi < H)
    ok_y1 = (yi >= -1) & (yi < H - 1)
    ok_x0 = (xi >= 0) & (xi < W)
    ok_x1 = (xi >= -1) & (xi < W - 1)
    a00 = plane + yi.to(tl.int64) * sxh + xi.to(tl.int64) * sxw
    ok00 = valid & ok_y0 & ok_x0
    ok01 = valid & ok_y0 & ok_x1
    ok10 = valid & ok_y1 & ok_x0
    ok11 = valid & ok_y1 & ok_x1
    v00 = tl.load(x_ptr + a00, mask=ok00, other=0).to(ACC)
    v01 = tl.load(x_ptr + a00 + sxw, mask=ok01, other=0).to(ACC)
    v10 = tl.load(x_ptr + a00 + sxh, mask=ok10, other=0).to(ACC)
    v11 = tl.load(x_ptr + a00 + sxh + sxw, mask=ok11, other=0).to(ACC)
    return v00, v01, v10, v11, ly, lx, a00, ok00, ok01, ok10, ok11


@triton.jit
def _bilinear(v00, v01, v10, v11, ly, lx, y, x, H, W):
    """torchvision's bilinear_interpolate: zero where y <= -1, y >= H, x <= -1 or x >= W (so an
    infinite corner at weight zero cannot make a NaN there; a NaN position is none of these, and
    its sample is NaN, as torchvision's), its weights and sum in its order. Also whether the
    position is inside (-1 < y < H and -1 < x < W; false for NaN), where dx gets its share."""
    hy = 1 - ly
    hx = 1 - lx
    val = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
    outside = (y <= -1) | (y >= H) | (x <= -1) | (x >= W)
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    return tl.where(outside, 0.0, val), inside


@triton.jit
def _columns(x_ptr, off_ptr, mask_ptr, n, c, k, p, valid, C, H, W, K, KW, P, Wout, Cd, D, sxn, sxc, sxh, sxw,
             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, HAS_MASK: tl.constexpr, ACC: tl.constexpr):
    """col[n, c, k, p] for broadcastable tiles of channels c, taps k and output pixels p."""
    d = c // Cd
    y, x, tap = _tap_position(off_ptr, n, d, k, p, valid, D, K, KW, P, Wout, stride_h, stride_w, pad_h, pad_w,
                              dil_h, dil_w, ACC)
    plane = n * sxn + c * sxc
    v00, v01, v10, v11, ly, lx, _, _, _, _, _ = _corners(x_ptr, plane, y, x, valid, H, W, sxh, sxw, ACC)
    val, _ = _bilinear(v00, v01, v10, v11, ly, lx, y, x, H, W)
    if HAS_MASK:
        val = tl.load(mask_ptr + tap * P + p, mask=valid, other=0).to(ACC) * val
    return val


@triton.jit
def _dot(a, b, acc, LOW_PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc + a @ b, a and b in the I/O dtype: float16/bfloat16 operands on the tensor cores,
    float32 (no TF32) and float64 in full precision. WIDEN: bfloat16 operands widened to float32
    first (exact: their products fit float32), for Triton's interpreter, whose tl.dot multiplies
    bfloat16 operands' raw bits."""
    if LOW_PRECISION and not WIDEN:
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, off_ptr, mask_ptr, bias_ptr, out_ptr,
    C, H, W, Hout, Wout, K, KW, Cg, Og, Cd, D,
    sxn, sxc, sxh, sxw, son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    P = Hout * Wout
    p_tiles = tl.cdiv(P, BLOCK_P)
    o_tiles = tl.cdiv(Og, BLOCK_O)
    n = (tl.program_id(0) // p_tiles).to(tl.int64)
    p = (tl.program_id(0) % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    g = tl.program_id(1) // o_tiles
    o = g * Og + (tl.program_id(1) % o_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    p_ok = p < P
    o_ok = o < (g + 1) * Og
    R = Cg * K  # the reduction: (channel of the group, tap), weight's contiguous (Cg, kh, kw) order
    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=ACC)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        w = tl.load(w_ptr + o[:, None].to(tl.int64) * R + r[None, :], mask=o_ok[:, None] & r_ok[None, :], other=0)
        c = (g * Cg + r // K).to(tl.int64)[:, None]
        col = _columns(x_ptr, off_ptr, mask_ptr, n, c, (r % K)[:, None], p[None, :], r_ok[:, None] & p_ok[None, :],
                       C, H, W, K, KW, P, Wout, Cd, D, sxn, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
                       dil_h, dil_w, HAS_MASK, ACC)
        acc = _dot(w, col.to(w.dtype), acc, LOW_PRECISION, WIDEN_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0).to(ACC)[:, None]
    ho = p // Wout
    wo = p - ho * Wout
    out = out_ptr + n * son + o[:, None].to(tl.int64) * soc + (ho.to(tl.int64) * soh + wo * sow)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & p_ok[None, :])


@triton.jit
def _input_grads_kernel(
    x_ptr, w_ptr, off_ptr, mask_ptr, dy_ptr, dx_ptr, doff_ptr, dmask_ptr,
    C, H, W, Hout, Wout, K, KW, Cg, Og, Cd, D, CHUNK,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, SCATTER_DX: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    P = Hout * Wout
    p_tiles = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    k = (pid // p_tiles) % K
    nd = pid // (p_tiles * K)  # n * D + d
    n = (nd // D).to(tl.int64)
    d = nd % D
    p = (pid % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    y, x, tap = _tap_position(off_ptr, n, d, k, p, p_ok, D, K, KW, P, Wout, stride_h, stride_w, pad_h, pad_w,
                              dil_h, dil_w, ACC)
    y, x = y[None, :], x[None, :]
    if HAS_MASK:
        m = tl.load(mask_ptr + tap * P + p, mask=p_ok, other=0).to(ACC)
    else:
        m = tl.full((BLOCK_P,), 1.0, ACC)
    ho = p // Wout
    dy_pixel = (ho.to(tl.int64) * sdh + (p - ho * Wout) * sdw)[None, :]
    grad_y = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    grad_x = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    grad_m = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
    # The channels of offset group d, in chunks that each lie in one weight group (CHUNK divides
    # both groups' widths), in tiles of BLOCK_C.
    for chunk in range(d * Cd, (d + 1) * Cd, CHUNK):
        g = chunk // Cg
        for c0 in range(chunk, chunk + CHUNK, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < chunk + CHUNK
            # dcol[c, p] = sum over the group's output channels o of weight[o, c, k] * dy[n, o, p]
            dcol = tl.zeros((BLOCK_C, BLOCK_P), dtype=ACC)
            for o0 in range(g * Og, (g + 1) * Og, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                o_ok = o < (g + 1) * Og
                wt = tl.load(w_ptr + o[None, :].to(tl.int64) * (Cg * K) + ((c - g * Cg) * K + k)[:, None],
                             mask=c_ok[:, None] & o_ok[None, :], other=0)
                dyt = tl.load(dy_ptr + n * sdn + o[:, None].to(tl.int64) * sdc + dy_pixel,
                              mask=o_ok[:, None] & p_ok[None, :], other=0)
                dcol = _dot(wt, dyt, dcol, LOW_PRECISION, WIDEN_DOT)
            valid = c_ok[:, None] & p_ok[None, :]
            plane = n * sxn + c.to(tl.int64)[:, None] * sxc
            v00, v01, v10, v11, ly, lx, a00, ok00, ok01, ok10, ok11 = _corners(
                x_ptr, plane, y, x, valid, H, W, sxh, sxw, ACC)
            hy = 1 - ly
            hx = 1 - lx
            # get_coordinate_weight: d(bilinear)/dy and d/dx, the corners' in-image tests only
            grad_y += dcol * (lx * (v11 - v01) + hx * (v10 - v00))
            grad_x += dcol * (ly * (v11 - v10) + hy * (v01 - v00))
            val, inside = _bilinear(v00, v01, v10, v11, ly, lx, y, x, H, W)
            if HAS_MASK:
                grad_m += dcol * val
            if SCATTER_DX:
                # torchvision's col2im adds to the pixels within distance 1 of the position: not
                # to a far corner at weight 0 (an infinite dy would put 0 * inf = NaN there).
                t = dcol * m[None, :]
                scatter = valid & inside
                ok01 &= lx > 0
                ok10 &= ly > 0
                ok11 &= (lx > 0) & (ly > 0)
                dx_ty = dx_ptr.dtype.element_ty
                tl.atomic_add(dx_ptr + a00, (t * (hy * hx)).to(dx_ty), mask=scatter & ok00, sem="relaxed")
                tl.atomic_add(dx_ptr + a00 + sxw, (t * (hy * lx)).to(dx_ty), mask=scatter & ok01, sem="relaxed")
                tl.atomic_add(dx_ptr + a00 + sxh, (t * (ly * hx)).to(dx_ty), mask=scatter & ok10, sem="relaxed")
                tl.atomic_add(dx_ptr + a00 + sxh + sxw, (t * (ly * lx)).to(dx_ty), mask=scatter & ok11,
                              sem="relaxed")
    out_ty = doff_ptr.dtype.element_ty
    doff = doff_ptr + 2 * tap * P + p
    tl.store(doff, (tl.sum(grad_y, axis=0) * m).to(out_ty), mask=p_ok)
    tl.store(doff + P, (tl.sum(grad_x, axis=0) * m).to(out_ty), mask=p_ok)
    if HAS_MASK:
        tl.store(dmask_ptr + tap * P + p, tl.sum(grad_m, axis=0).to(out_ty), mask=p_ok)


@triton.jit
def _input_grad_gather_kernel(
    w_ptr, dy_ptr, dx_ptr, start_ptr, entry_ptr, coef_ptr, longest_ptr,
    H, W, Hout, Wout, K, Cg, Og, Cd, D,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    HW = H * W
    P = Hout * Wout
    # One grid axis (whose limit is 2^31 - 1; the others' is 65535): (n, d, channel tile, pixel tile).
    q_tiles = tl.cdiv(HW, BLOCK_Q)
    c_tiles = tl.cdiv(Cd, BLOCK_C)
    pid = tl.program_id(0)
    q_tile = pid % q_tiles
    nd = pid // (q_tiles * c_tiles)  # n * D + d
    n = (nd // D).to(tl.int64)
    d = nd % D
    c = d * Cd + (pid // q_tiles % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < (d + 1) * Cd
    g = c // Cg
    w_base = (g * Og).to(tl.int64) * (Cg * K) + (c - g * Cg) * K  # weight[g*Og, c, 0]
    dy_base = n * sdn + (g * Og).to(tl.int64) * sdc  # dy[n, g*Og]
    # Every vector [1, BLOCK_Q] (sliced 1-D ones made Triton 3.7's layout passes fail on the loads)
    q = (q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q))[None, :]
    q_ok = q < HW
    segment = nd.to(tl.int64) * HW + q
    first = tl.load(start_ptr + segment, mask=q_ok, other=0)
    count = tl.load(start_ptr + segment + 1, mask=q_ok, other=0) - first
    acc = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
    # The j-th sample landing on each pixel, in the stable sort's order: a fixed summation order.
    # (Up to the longest run of any pixel of the tile, from the host: a loop bound reduced from
    # `count` in the kernel fails Triton 3.7's layout passes.)
    longest = tl.load(longest_ptr + nd.to(tl.int64) * q_tiles + q_tile)
    for j in range(0, longest):
        e_ok = q_ok & (j < count)
        entry = tl.load(entry_ptr + first + j, mask=e_ok, other=0)  # k * P + p of the sample
        coef = tl.load(coef_ptr + first + j, mask=e_ok, other=0)  # its mask times the corner's weight
        k = entry // P
        p = entry - k * P
        ho = p // Wout
        dy_pixel = ho.to(tl.int64) * sdh + (p - ho * Wout) * sdw
        ok = c_ok[:, None] & e_ok
        w = w_ptr + w_base[:, None] + k
        dyo = dy_ptr + dy_base[:, None] + dy_pixel
        dcol = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
        for _ in range(0, Og):  # the output channels of c's weight group, one at a time
            dcol += tl.load(w, mask=ok, other=0).to(ACC) * tl.load(dyo, mask=ok, other=0).to(ACC)
            w += Cg * K
            dyo += sdc
        acc += dcol * coef
    h = q // W
    dx = dx_ptr + n * sxn + c.to(tl.int64)[:, None] * sxc + (h.to(tl.int64) * sxh + (q - h * W) * sxw)
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=c_ok[:, None] & q_ok)


@triton.jit
def _weight_grad_kernel(
    x_ptr, off_ptr, mask_ptr, dy_ptr, part_ptr,
    N, C, H, W, O, Hout, Wout, K, KW, Cg, Og, Cd, D, tiles_per_split,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_MASK: tl.constexpr, F64: tl.constexpr, LOW_PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    P = Hout * Wout
    R = Cg * K
    o_tiles = tl.cdiv(Og, BLOCK_O)
    r_tiles = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    g = pid // (o_tiles * r_tiles)
    o = g * Og + (pid // r_tiles % o_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)
    r = (pid % r_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = o < (g + 1) * Og
    r_ok = r < R
    c = (g * Cg + r // K).to(tl.int64)[:, None]
    k = (r % K)[:, None]
    split = tl.program_id(1)
    p_tiles = tl.cdiv(P, BLOCK_P)
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=ACC)
    # This split's run of (sample, pixel tile) pairs, in order.
    for t in range(split * tiles_per_split, tl.minimum(N * p_tiles, (split + 1) * tiles_per_split)):
        n = (t // p_tiles).to(tl.int64)
        p = (t % p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        ho = p // Wout
        dyt = tl.load(dy_ptr + n * sdn + o[:, None].to(tl.int64) * sdc + (ho.to(tl.int64) * sdh + (p - ho * Wout) * sdw)[None, :],
                      mask=o_ok[:, None] & p_ok[None, :], other=0)
        col = _columns(x_ptr, off_ptr, mask_ptr, n, c, k, p[None, :], r_ok[:, None] & p_ok[None, :],
                       C, H, W, K, KW, P, Wout, Cd, D, sxn, sxc, sxh, sxw, stride_h, stride_w, pad_h, pad_w,
                       dil_h, dil_w, HAS_MASK, ACC)  # [BLOCK_R, BLOCK_P], as the forward's
        # (Sampled [BLOCK_P, BLOCK_R] directly, the float64 dot failed Triton 3.7's LLVM lowering.)
        acc = _dot(dyt, tl.trans(col.to(dyt.dtype)), acc, LOW_PRECISION, WIDEN_DOT)
    part = part_ptr + (split.to(tl.int64) * O + o[:, None]) * R + r[None, :]
    tl.store(part, acc, mask=o_ok[:, None] & r_ok[None, :])


def _pow2_between(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


class _Geometry:
    """The sizes and strides every launch takes, from the op's arguments."""

    def __init__(self, x, weight, offset, stride, padding, dilation):
        self.N, self.C, self.H, self.W = x.shape
        self.O, self.Cg, kh, self.KW = weight.shape
        self.K = kh * self.KW
        self.G = self.C // self.Cg
        self.Og = self.O // self.G
        self.D = offset.shape[1] // (2 * self.K)
        self.Cd = self.C // self.D
        self.Hout, self.Wout = offset.shape[2], offset.shape[3]
        self.P = self.Hout * self.Wout
        self.conv = (*stride, *padding, *dilation)
        self.f64 = acc_dtype(x.dtype) == torch.float64
        self.low_precision = x.dtype in (torch.float16, torch.bfloat16)
        self.widen_dot = x.dtype == torch.bfloat16 and not x.is_cuda  # see _dot
        # Tiles: tl.dot needs 16 or more along each side. Small enough for registers in float64 and
        # for the interpreter at test shapes; the same for a shape on every run (no autotuning).
        # Compiled for sm_80 and sm_90a at the tiles of ResNet-50's shapes (64 output channels and
        # pixels): at 4 warps the float32 kernels spilled 270 to 1360 B and the bfloat16 input
        # gradients sat at 255 registers. At 8 warps, bfloat16/float16 with 64x64 tiles and float32
        # with 32 output channels (and 32 pixels in its weight gradient) compile with at most 16 B
        # of spills (bf16 weight gradient, sm_80); 100 to 230 registers. float64 (for tests and
        # precision, not speed) keeps 4 warps and smaller tiles: 32 or 64 pixels spilled up to
        # 196 B in its forward.
        wide = self.low_precision
        self.num_warps = 4 if self.f64 else 8
        self.block_p = _pow2_between(self.P, 16, 64)
        self.block_p_forward = 16 if self.f64 else self.block_p
        self.block_p_weight = self.block_p if wide else min(self.block_p, 32)
        self.block_o = _pow2_between(self.Og, 16, 64 if wide else 32)
        self.block_c = 16  # the input gradients' channels per step; 32 spilled (bf16 at 8 warps, float32)
        self.block_r = 16


def _output_like(x: torch.Tensor, shape, dtype) -> torch.Tensor:
    """An empty tensor of `shape` in x's memory format (channels_last where x is)."""
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def deform_conv2d(x, weight, offset, mask, bias, stride, padding, dilation) -> torch.Tensor:
    geo = _Geometry(x, weight, offset, stride, padding, dilation)
    out = _output_like(x, (geo.N, geo.O, geo.Hout, geo.Wout), x.dtype)
    if out.numel() == 0:
        return out
    weight, offset = weight.contiguous(), offset.contiguous()
    grid = (geo.N * triton.cdiv(geo.P, geo.block_p_forward), geo.G * triton.cdiv(geo.Og, geo.block_o))
    with device_guard(x):
        _forward_kernel[grid](  # absent mask and bias: stand-in pointers, never read
            x, weight, offset, mask.contiguous() if mask is not None else offset,
            bias if bias is not None else weight, out,
            geo.C, geo.H, geo.W, geo.Hout, geo.Wout, geo.K, geo.KW, geo.Cg, geo.Og, geo.Cd, geo.D,
            *x.stride(), *out.stride(), *geo.conv,
            HAS_MASK=mask is not None, HAS_BIAS=bias is not None, F64=geo.f64, LOW_PRECISION=geo.low_precision, WIDEN_DOT=geo.widen_dot,
            BLOCK_O=geo.block_o, BLOCK_R=geo.block_r, BLOCK_P=geo.block_p_forward, num_warps=geo.num_warps,
        )
    return out


def _gather_plan(geo, offset, mask, acc, block_q):
    """For the deterministic dx: every (sample, corner) pair that lands inside the image, sorted by
    the pixel it lands on. Returns (start, entry, coef, longest): the pairs of pixel q of (n, offset
    group d) are entries start[(n*D + d)*H*W + q] to start[... + 1], entry = k*P + p of their
    sample, coef = its mask times the corner's bilinear weight; longest[(n*D + d), tile] is the most
    pairs of any pixel of that tile of block_q pixels (the gather's loop bound there). The positions
    and weights are the kernels' (_tap_position, _corners), in torch."""
    N, D, K, P, H, W = geo.N, geo.D, geo.K, geo.P, geo.H, geo.W
    sh, sw, ph, pw, dh, dw = geo.conv
    dev = offset.device
    off = offset.reshape(N, D, K, 2, P).to(acc)
    k = torch.arange(K, device=dev)
    ho, wo = torch.arange(P, device=dev) // geo.Wout, torch.arange(P, device=dev) % geo.Wout
    y = (ho * sh - ph + (k // geo.KW * dh)[:, None]).to(acc) + off[:, :, :, 0]
    x = (wo * sw - pw + (k % geo.KW * dw)[:, None]).to(acc) + off[:, :, :, 1]
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    y0 = y.clamp(-2, H + 1).floor()
    x0 = x.clamp(-2, W + 1).floor()
    ly, lx = y - y0, x - x0
    m = mask.reshape(N, D, K, P).to(acc) if mask is not None else torch.ones_like(y)
    corners = []
    for cy, wy in ((0, 1 - ly), (1, ly)):
        for cx, wx in ((0, 1 - lx), (1, lx)):
            yc, xc = y0.long() + cy, x0.long() + cx
            ok = inside & (yc >= 0) & (yc < H) & (xc >= 0) & (xc < W)
            # As the atomic scatter: not the far corner at weight 0 of a position on a pixel row or column.
            if cy:
                ok &= ly > 0
            if cx:
                ok &= lx > 0
            corners.append((ok, yc * W + xc, m * (wy * wx)))
    ok = torch.stack([c[0] for c in corners], -1)  # (N, D, K, P, 4)
    pixel = torch.stack([c[1] for c in corners], -1)
    coef = torch.stack([c[2] for c in corners], -1)
    segment = torch.arange(N * D, device=dev).reshape(N, D, 1, 1, 1) * (H * W) + pixel
    key = torch.where(ok, segment, N * D * H * W).flatten()  # pairs outside the image sort last
    key, order = torch.sort(key, stable=True)
    start = torch.searchsorted(key, torch.arange(N * D * H * W + 1, device=dev))
    entry = (order // 4) % (K * P)
    counts = start.diff().reshape(N * D, H * W)
    tiles = triton.cdiv(H * W, block_q)
    longest = torch.nn.functional.pad(counts, (0, tiles * block_q - H * W)).reshape(N * D, tiles, block_q).amax(-1)
    return (start, entry.to(torch.int32 if K * P < 2**31 else torch.int64), coef.flatten()[order],
            longest.to(torch.int32))


def _weight_grad(geo, x, offset, mask, dy, has_mask):
    R = geo.Cg * geo.K
    tiles = geo.G * triton.cdiv(geo.Og, geo.block_o) * triton.cdiv(R, geo.block_r)
    pixel_tiles = geo.N * triton.cdiv(geo.P, geo.block_p_weight)
    splits = max(1, min(pixel_tiles, triton.cdiv(_PROGRAMS_PER_SM * sm_count(x), tiles)))
    per_split = triton.cdiv(pixel_tiles, splits)
    splits = triton.cdiv(pixel_tiles, per_split)
    part = torch.empty((splits, geo.O, R), dtype=acc_dtype(x.dtype), device=x.device)
    _weight_grad_kernel[(tiles, splits)](
        x, offset, mask, dy, part,
        geo.N, geo.C, geo.H, geo.W, geo.O, geo.Hout, geo.Wout, geo.K, geo.KW, geo.Cg, geo.Og, geo.Cd, geo.D, per_split,
        *x.stride(), *dy.stride(), *geo.conv,
        HAS_MASK=has_mask, F64=geo.f64, LOW_PRECISION=geo.low_precision, WIDEN_DOT=geo.widen_dot,
        BLOCK_O=geo.block_o, BLOCK_R=geo.block_r, BLOCK_P=geo.block_p_weight, num_warps=geo.num_warps,
    )
    return part.sum(0)  # the splits in a fixed order


def deform_conv2d_backward(dy, x, weight, offset, mask, has_bias: bool, stride, padding, dilation):
    """(dx, dweight, doffset, dmask, dbias); dmask None without mask, dbias None without bias.
    dx by atomics, or gathered in a fixed order under torch.use_deterministic_algorithms(True)."""
    geo = _Geometry(x, weight, offset, stride, padding, dilation)
    acc = acc_dtype(x.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    weight, offset = weight.contiguous(), offset.contiguous()
    has_mask = mask is not None
    mask = mask.contiguous() if has_mask else None
    doffset = torch.empty_like(offset)
    dmask = torch.empty_like(mask) if has_mask else None
    dbias = dy.sum((0, 2, 3), dtype=acc).to(weight.dtype) if has_bias else None
    if geo.N == 0:
        return torch.zeros_like(x), torch.zeros_like(weight), doffset, dmask, dbias
    # Atomics accumulate in the accumulator dtype: into dx itself for float32/float64.
    scatter_into = torch.zeros_like(x, dtype=acc) if not deterministic else None
    mask_arg = mask if has_mask else offset  # a stand-in pointer, never read
    with device_guard(x):
        _input_grads_kernel[(geo.N * geo.D * geo.K * triton.cdiv(geo.P, geo.block_p),)](
            x, weight, offset, mask_arg, dy, scatter_into if scatter_into is not None else x, doffset,
            dmask if has_mask else doffset,
            geo.C, geo.H, geo.W, geo.Hout, geo.Wout, geo.K, geo.KW, geo.Cg, geo.Og, geo.Cd, geo.D,
            math.gcd(geo.Cd, geo.Cg), *x.stride(), *dy.stride(), *geo.conv,
            HAS_MASK=has_mask, SCATTER_DX=not deterministic, F64=geo.f64, LOW_PRECISION=geo.low_precision, WIDEN_DOT=geo.widen_dot,
            BLOCK_C=geo.block_c, BLOCK_O=geo.block_o, BLOCK_P=geo.block_p, num_warps=geo.num_warps,
        )
        if deterministic:
            dx = _output_like(x, x.shape, x.dtype)
        if deterministic and x.numel():  # (an image of no pixels, padded to an output, has none to gather)
            block_c = _pow2_between(geo.Cd, 1, 16)
            block_q = _pow2_between(geo.H * geo.W, 16, 64)
            start, entry, coef, longest = _gather_plan(geo, offset, mask, acc, block_q)
            grid = (geo.N * geo.D * triton.cdiv(geo.Cd, block_c) * triton.cdiv(geo.H * geo.W, block_q),)
            _input_grad_gather_kernel[grid](
                weight, dy, dx, start, entry, coef, longest,
                geo.H, geo.W, geo.Hout, geo.Wout, geo.K, geo.Cg, geo.Og, geo.Cd, geo.D,
                *x.stride(), *dy.stride(), F64=geo.f64, BLOCK_C=block_c, BLOCK_Q=block_q,
            )
        if not deterministic:
            dx = scatter_into.to(x.dtype)
        dweight = _weight_grad(geo, x, offset, mask_arg, dy, has_mask).to(weight.dtype).reshape(weight.shape)
    return dx, dweight, doffset, dmask, dbias
