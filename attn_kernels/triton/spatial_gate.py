"""Spatial-gate primitives in Triton (CBAM, and its spatial attention alone), with the signatures
of the CUDA ones (csrc/spatial_gate.cu).

u = x * ca[n, c] (u = x when there is no channel gate ca) is never written to memory: each kernel
recomputes it, the same way, so ties found in one pass are found again in the next.

  spatial_pool(x, ca) -> (mean, max, ties)                               reads x
      over C per pixel: mean and max of u (NaN if any u is, as torch.amax), and how many u tie
      the max (none for a NaN max)
  spatial_grad_reduce(dy, x, ca, sa) -> (dsa, dca)                       reads dy, x
      dsa[n,hw] = sum_c dy*u;  dca[n,c] = sum_hw dy*x*sa[n,hw] (empty without ca)
  spatial_pool_grad_reduce(x, ca, smax, pmean, pmax, cmax) -> (dca, cties)   reads x
      dca[n,c] = sum_hw x * (pmean[n,hw] + (u == smax[n,hw]) * pmax[n,hw]);  cties[n,c] = count(x == cmax[n,c])
  spatial_gate_apply(a, ca, sa, x, smax, pmean, pmax, cbias, cmax, ctie) -> out   reads a (and x), writes out
      out = ca * (a*sa + pmean + (u == smax)*pmax) + cbias + (x == cmax)*ctie
      forward: a = x, with ca and sa only; the other terms are backward's.

Per-pixel statistics are (N, H*W) and per-channel ones (N, C), contiguous, in the accumulator
dtype. Partial results are combined in a fixed order: no atomics, bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from .channel_gate import (
    TARGET_PROGRAMS_PER_SM, sm_count, check_activation, check_stats, device_guard, nan_max, nan_maximum, split_hw,
    strides, tile_shape, tile_warps,
)

_TILE_ELEMENTS = 2048  # elements of x a program holds per loop step


def tile_shape_over_c(t: torch.Tensor):
    """(BLOCK_C, BLOCK_HW) of a program that loops over C for a tile of pixels."""
    C, HW = t.shape[1], t.shape[2] * t.shape[3]
    if t.is_contiguous():  # NCHW: pixels are contiguous
        block_hw = min(triton.next_power_of_2(HW), 128)
        block_c = min(triton.next_power_of_2(C), max(1, _TILE_ELEMENTS // block_hw))
    else:
        block_c = min(triton.next_power_of_2(C), 128)
        block_hw = min(triton.next_power_of_2(HW), max(1, _TILE_ELEMENTS // block_c))
    return block_c, block_hw


# The fewest channels a split of a reduction over C takes: its partials (3 per pixel, written and
# read again) cost at most 24 / (MIN_SPLIT_C * x's element size) of x's bytes, 9% in bf16.
MIN_SPLIT_C = 128


def split_c(x: torch.Tensor, block_c: int, programs: int):
    """(splits, c_per_split) of a reduction over C with one program per (n, pixel tile, split): C
    is split until the grid fills the GPU (at 2048x7x7 and N = 32, one program per sample would
    leave most SMs idle), in chunks of whole BLOCK_C tiles and at least MIN_SPLIT_C channels."""
    C = x.shape[1]
    want = triton.cdiv(TARGET_PROGRAMS_PER_SM * sm_count(x), programs)
    splits = max(1, min(want, triton.cdiv(C, block_c), C // MIN_SPLIT_C))
    per_split = triton.cdiv(triton.cdiv(C, splits), block_c) * block_c
    return triton.cdiv(C, per_split), per_split


@triton.jit
def _max_ties_update(run_max, run_ties, chunk_max, chunk_ties):
    """The running max of u and its tie count, given a chunk's."""
    run_ties = tl.where(
        chunk_max > run_max, chunk_ties, tl.where(chunk_max == run_max, run_ties + chunk_ties, run_ties)
    )
    return nan_maximum(run_max, chunk_max), run_ties


@triton.jit
def _reduce_over_c_kernel(
    a_ptr, b_ptr, ca_ptr, sa_ptr, first_ptr, max_ptr, ties_ptr, dca_part_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, c_per_split, divisor,
    GRAD: tl.constexpr, HAS_CA: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, pixel tile, split of C), looping over its channels. GRAD=False (a = x):
    # first = sum_c(u) / divisor, and the max of u with its tie count. GRAD=True (a = dy, b = x):
    # first = sum_c dy*u, and with HAS_CA this tile's share of sum_hw dy*x*sa for each of its
    # channels, into dca_part[n, tile, c]. Per-pixel outputs are the split's: [split][n][hw].
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    n = pid // hw_tiles
    hw_tile = pid % hw_tiles
    hw = hw_tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    c_begin = split * c_per_split
    c_end = tl.minimum(C, c_begin + c_per_split)
    acc_ty = first_ptr.dtype.element_ty

    total = tl.zeros((BLOCK_HW,), dtype=acc_ty)
    run_max = tl.full((BLOCK_HW,), float("-inf"), dtype=acc_ty)
    run_ties = tl.zeros((BLOCK_HW,), dtype=acc_ty)
    if GRAD:
        sa = tl.load(sa_ptr + n * HW + hw, mask=hw_mask, other=0)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < c_end
        mask = c_mask[:, None] & hw_mask[None, :]
        offsets = n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
        a = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
        if HAS_CA:
            ca = tl.load(ca_ptr + n * C + c, mask=c_mask, other=0)[:, None]
        if GRAD:
            p = a * tl.load(b_ptr + offsets, mask=mask, other=0).to(acc_ty)  # dy * x
            if HAS_CA:
                total += tl.sum(p * ca, axis=0)
                part = tl.sum(p * sa[None, :], axis=1)
                tl.store(dca_part_ptr + (n * hw_tiles + hw_tile) * C + c, part, mask=c_mask)
            else:
                total += tl.sum(p, axis=0)
        else:
            if HAS_CA:
                u = a * ca
            else:
                u = a
            total += tl.sum(u, axis=0)
            u = tl.where(mask, u, float("-inf"))
            chunk_max = nan_max(u, 0)
            chunk_ties = tl.sum(tl.where(u == chunk_max[None, :], 1.0, 0.0), axis=0).to(acc_ty)
            run_max, run_ties = _max_ties_update(run_max, run_ties, chunk_max, chunk_ties)
    out = (split * N + n) * HW + hw
    tl.store(first_ptr + out, total / divisor, mask=hw_mask)
    if not GRAD:
        tl.store(max_ptr + out, run_max, mask=hw_mask)
        # A NaN max has no ties (nothing equals it), as the count torch.amax's gradient divides by.
        tl.store(ties_ptr + out, tl.where(run_max != run_max, 0.0, run_ties), mask=hw_mask)


@triton.jit
def _combine_splits_kernel(
    part_first_ptr, part_max_ptr, part_ties_ptr, first_ptr, max_ptr, ties_ptr, pixels, splits, divisor,
    MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    # The splits' partials of each pixel folded in split order: first = sum / divisor and, with
    # MAX, the max and its ties as _reduce_over_c_kernel folds chunks.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < pixels
    acc_ty = first_ptr.dtype.element_ty
    total = tl.zeros((BLOCK,), dtype=acc_ty)
    run_max = tl.full((BLOCK,), float("-inf"), dtype=acc_ty)
    run_ties = tl.zeros((BLOCK,), dtype=acc_ty)
    for split in range(0, splits):
        total += tl.load(part_first_ptr + split * pixels + i, mask=mask, other=0)
        if MAX:
            chunk_max = tl.load(part_max_ptr + split * pixels + i, mask=mask, other=0)
            chunk_ties = tl.load(part_ties_ptr + split * pixels + i, mask=mask, other=0)
            run_max, run_ties = _max_ties_update(run_max, run_ties, chunk_max, chunk_ties)
    tl.store(first_ptr + i, total / divisor, mask=mask)
    if MAX:
        tl.store(max_ptr + i, run_max, mask=mask)
        tl.store(ties_ptr + i, tl.where(run_max != run_max, 0.0, run_ties), mask=mask)


def combine_c_splits(parts, outputs, divisor: float):
    """Folds the per-pixel partials of a reduction over C split across programs, (splits, N, H*W)
    each, into outputs (N, H*W) each, in split order: [first] (first = sum / divisor), or [first,
    max, ties]."""
    pixels = outputs[0].numel()
    # Pixels per program: spread over the SMs (at 2048x7x7 and N = 32, 1024 per program left 2
    # programs to fold 16 splits), one per thread of 4 warps at least.
    per_program = triton.cdiv(pixels, TARGET_PROGRAMS_PER_SM * sm_count(outputs[0]))
    block = max(128, min(1024, triton.next_power_of_2(per_program)))
    with_max = len(parts) == 3
    part_first, part_max, part_ties = parts if with_max else parts * 3  # MAX=False reads only the first
    first, xmax, ties = outputs if with_max else outputs * 3
    _combine_splits_kernel[(triton.cdiv(pixels, block),)](
        part_first, part_max, part_ties, first, xmax, ties, pixels, parts[0].shape[0], divisor,
        MAX=with_max, BLOCK=block, num_warps=tile_warps(block, first.dtype),
    )


def _reduce_over_c(a, b, ca, sa, grad: bool):
    """The per-pixel outputs of _reduce_over_c_kernel ((N, H*W) each: first, and max and ties or
    None) and dca_part (N, pixel tiles, C) or None; C split across programs where N alone would
    not fill the GPU, the splits folded by combine_c_splits."""
    N, C, H, W = a.shape
    HW = H * W
    acc = acc_dtype(a.dtype)
    block_c, block_hw = tile_shape_over_c(a)
    hw_tiles = triton.cdiv(HW, block_hw)
    splits, c_per_split = split_c(a, block_c, N * hw_tiles)
    outputs = [torch.empty((N, HW), dtype=acc, device=a.device) for _ in range(1 if grad else 3)]
    parts = outputs if splits == 1 else [torch.empty((splits, N, HW), dtype=acc, device=a.device) for _ in outputs]
    first = parts[0]
    dca_part = torch.empty((N, hw_tiles, C), dtype=acc, device=a.device) if grad and ca is not None else None
    with device_guard(a):
        _reduce_over_c_kernel[(N * hw_tiles, splits)](
            a, b, ca if ca is not None else first, sa if sa is not None else first, first,
            parts[1] if not grad else first, parts[2] if not grad else first,
            dca_part if dca_part is not None else first,
            N, C, HW, *strides(a), c_per_split, 1.0 if grad or splits > 1 else float(C),
            GRAD=grad, HAS_CA=ca is not None, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=tile_warps(block_c * block_hw, a.dtype),
        )
        if splits > 1:
            combine_c_splits(parts, outputs, 1.0 if grad else float(C))
    return outputs[0], (None if grad else outputs[1]), (None if grad else outputs[2]), dca_part


def spatial_pool(x: torch.Tensor, ca=None):
    op = "spatial_pool"
    check_activation(op, "x", x)
    N, C, H, W = x.shape
    HW = H * W
    check_stats(op, x, (N, C), ca=ca)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return tuple(x.new_zeros((N, HW), dtype=acc) for _ in range(3))
    mean, xmax, ties, _ = _reduce_over_c(x, x, ca, None, grad=False)
    return mean, xmax, ties


def spatial_grad_reduce(dy: torch.Tensor, x: torch.Tensor, ca, sa: torch.Tensor):
    op = "spatial_grad_reduce"
    check_activation(op, "x", x)
    check_activation(op, "dy", dy, like=x)
    N, C, H, W = x.shape
    HW = H * W
    check_stats(op, x, (N, C), ca=ca)
    check_stats(op, x, (N, HW), sa=sa)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros((N, HW), dtype=acc), x.new_zeros((N, C) if ca is not None else (0,), dtype=acc)
    dsa, _, _, dca_part = _reduce_over_c(dy, x, ca, sa, grad=True)
    return dsa, dca_part.sum(1) if dca_part is not None else x.new_empty((0,), dtype=acc)


@triton.jit
def _pool_grad_kernel(
    x_ptr, ca_ptr, smax_ptr, pmean_ptr, pmax_ptr, cmax_ptr, dca_ptr, ties_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, channel tile, split of H*W), as channel_gate's reductions.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = n * stride_n + c[:, None] * stride_c
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    acc_ty = dca_ptr.dtype.element_ty
    ca = tl.load(ca_ptr + n * C + c, mask=c_mask, other=0)[:, None]
    cmax = tl.load(cmax_ptr + n * C + c, mask=c_mask, other=0)[:, None]

    dca = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    ties = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hw_mask = hw < hw_end
        mask = c_mask[:, None] & hw_mask[None, :]
        x = tl.load(x_ptr + base + hw[None, :] * stride_hw, mask=mask, other=0).to(acc_ty)
        pixel = n * HW + hw
        pmean = tl.load(pmean_ptr + pixel, mask=hw_mask, other=0)[None, :]
        pmax = tl.load(pmax_ptr + pixel, mask=hw_mask, other=0)[None, :]
        smax = tl.load(smax_ptr + pixel, mask=hw_mask, other=0)[None, :]
        dca += x * (pmean + tl.where(x * ca == smax, pmax, 0.0))
        ties += tl.where(mask & (x == cmax), 1.0, 0.0).to(acc_ty)
    out = split * N * C + n * C + c
    tl.store(dca_ptr + out, tl.sum(dca, axis=1), mask=c_mask)
    tl.store(ties_ptr + out, tl.sum(ties, axis=1), mask=c_mask)


def spatial_pool_grad_reduce(x, ca, smax, pmean, pmax, cmax):
    op = "spatial_pool_grad_reduce"
    check_activation(op, "x", x)
    N, C, H, W = x.shape
    HW = H * W
    check_stats(op, x, (N, C), ca=ca, cmax=cmax)
    check_stats(op, x, (N, HW), smax=smax, pmean=pmean, pmax=pmax)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros((N, C), dtype=acc), x.new_zeros((N, C), dtype=acc)
    block_c, block_hw = tile_shape(x)
    tiles, splits, per_split = split_hw(x, block_c, block_hw)
    dca, ties = (torch.empty((splits, N, C), dtype=acc, device=x.device) for _ in range(2))
    with device_guard(x):
        _pool_grad_kernel[(tiles, splits)](
            x, ca, smax, pmean, pmax, cmax, dca, ties, N, C, HW, *strides(x), per_split,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=tile_warps(block_c * block_hw, x.dtype),
        )
    return dca.sum(0), ties.sum(0)


@triton.jit
def _spatial_apply_kernel(
    a_ptr, ca_ptr, sa_ptr, x_ptr, smax_ptr, pmean_ptr, pmax_ptr, cbias_ptr, cmax_ptr, ctie_ptr, out_ptr,
    C, HW, stride_n, stride_c, stride_hw,
    HAS_CA: tl.constexpr, SPATIAL_GRAD: tl.constexpr, CHANNEL_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, channel tile, pixel tile).
    pid = tl.program_id(0).to(tl.int64)
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    c_tiles = tl.cdiv(C, BLOCK_C)
    hw_tile = pid % hw_tiles
    c_tile = (pid // hw_tiles) % c_tiles
    n = pid // (hw_tiles * c_tiles)
    c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = hw_tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    hw_mask = hw < HW
    mask = c_mask[:, None] & hw_mask[None, :]
    offsets = n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
    channel = n * C + c
    pixel = n * HW + hw
    acc_ty = sa_ptr.dtype.element_ty

    a = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
    out = a * tl.load(sa_ptr + pixel, mask=hw_mask, other=0)[None, :]
    if HAS_CA:
        ca = tl.load(ca_ptr + channel, mask=c_mask, other=0)[:, None]
    if SPATIAL_GRAD:
        x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
        if HAS_CA:
            u = x * ca
        else:
            u = x
        smax = tl.load(smax_ptr + pixel, mask=hw_mask, other=0)[None, :]
        pmax = tl.load(pmax_ptr + pixel, mask=hw_mask, other=0)[None, :]
        out += tl.load(pmean_ptr + pixel, mask=hw_mask, other=0)[None, :] + tl.where(u == smax, pmax, 0.0)
    if HAS_CA:
        out = out * ca
    if CHANNEL_GRAD:
        cmax = tl.load(cmax_ptr + channel, mask=c_mask, other=0)[:, None]
        ctie = tl.load(ctie_ptr + channel, mask=c_mask, other=0)[:, None]
        out += tl.load(cbias_ptr + channel, mask=c_mask, other=0)[:, None] + tl.where(x == cmax, ctie, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def spatial_gate_apply(a, ca, sa, x=None, smax=None, pmean=None, pmax=None, cbias=None, cmax=None, ctie=None):
    op = "spatial_gate_apply"
    check_activation(op, "a", a)
    N, C, H, W = a.shape
    HW = H * W
    spatial_grad = x is not None
    channel_grad = cbias is not None
    if any((t is not None) != spatial_grad for t in (smax, pmean, pmax)):
        raise ValueError(f"{op}(): arguments 'x', 'smax', 'pmean' and 'pmax' must be given together or not at all")
    if any((t is not None) != channel_grad for t in (cmax, ctie)):
        raise ValueError(f"{op}(): arguments 'cbias', 'cmax' and 'ctie' must be given together or not at all")
    if channel_grad and (ca is None or not spatial_grad):
        raise ValueError(f"{op}(): the channel terms 'cbias', 'cmax', 'ctie' need 'ca' and the spatial terms")
    if spatial_grad:
        check_activation(op, "x", x, like=a)
    check_stats(op, a, (N, C), ca=ca, cbias=cbias, cmax=cmax, ctie=ctie)
    check_stats(op, a, (N, HW), sa=sa, smax=smax, pmean=pmean, pmax=pmax)
    out = torch.empty_like(a)
    if a.numel() == 0:
        return out
    block_c, block_hw = tile_shape(a)
    grid = (N * triton.cdiv(C, block_c) * triton.cdiv(HW, block_hw),)
    with device_guard(a):
        _spatial_apply_kernel[grid](
            a, *(t if t is not None else sa for t in (ca, sa, x, smax, pmean, pmax, cbias, cmax, ctie)), out,
            C, HW, *strides(a),
            HAS_CA=ca is not None, SPATIAL_GRAD=spatial_grad, CHANNEL_GRAD=channel_grad,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=tile_warps(block_c * block_hw, a.dtype),
        )
    return out
