"""Multi-path primitives in Triton (Selective Kernel): the outputs of P <= MAX_PATHS branches, all of
one shape, dtype and memory layout, mixed by per-(n, c) weights.

  path_mix(paths, weights) -> y                      reads every path, writes y:
      y = sum_p weights[p, n, c] * paths[p]
  path_grad_reduce(dy, paths) -> dots                reads dy and every path:
      dots[p, n, c] = sum over H*W of dy * paths[p]
  path_grad_apply(dy, weights, bias) -> dxs          reads dy, writes one gradient per path:
      dxs[p] = weights[p, n, c] * dy + bias[n, c]

Weights and bias are in the accumulator dtype (float32; float64 for float64 paths), (P, N, C) and
(N, C), contiguous. There is no CUDA twin: the paths arrive as separate tensors, and Triton's
constexpr path count unrolls one pointer per path. Reductions are split over H*W as in
channel_gate.py and summed in a fixed order: no atomics, bitwise reproducible.
"""
from typing import List

import torch
import triton
import triton.language as tl

from ..ops.primitives import MAX_PATHS, acc_dtype
from .channel_gate import check_activation, check_stats, device_guard, split_hw, strides, tile_shape, tile_warps


def _check_paths(op: str, paths: List[torch.Tensor], like: torch.Tensor = None):
    if not 1 <= len(paths) <= MAX_PATHS:
        raise ValueError(f"{op}(): argument 'paths' must hold 1 to {MAX_PATHS} tensors, got {len(paths)}")
    check_activation(op, "paths[0]", paths[0], like=like)
    for i, p in enumerate(paths[1:], 1):
        check_activation(op, f"paths[{i}]", p, like=paths[0])


def _padded(paths: List[torch.Tensor]) -> List[torch.Tensor]:
    """MAX_PATHS pointers for the kernels: the unused ones repeat the first (never read)."""
    return list(paths) + [paths[0]] * (MAX_PATHS - len(paths))


@triton.jit
def _tile(pid, C, HW, stride_n, stride_c, stride_hw, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """(offsets, mask, stat index, channel mask) of an elementwise program's (n, C tile, H*W tile)."""
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n = pid // (hw_tiles * c_tiles)
    c = ((pid // hw_tiles) % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = (pid % hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    offsets = n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
    return offsets, mask, n * C + c, c_mask


@triton.jit
def _mix_kernel(
    x0_ptr, x1_ptr, x2_ptr, x3_ptr, w_ptr, out_ptr,
    N, C, HW, stride_n, stride_c, stride_hw,
    PATHS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets, mask, stat, c_mask = _tile(pid, C, HW, stride_n, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    acc_ty = w_ptr.dtype.element_ty
    NC = N * C
    y = tl.load(x0_ptr + offsets, mask=mask, other=0).to(acc_ty) * tl.load(w_ptr + stat, mask=c_mask)[:, None]
    if PATHS > 1:
        y += tl.load(x1_ptr + offsets, mask=mask, other=0).to(acc_ty) * tl.load(w_ptr + NC + stat, mask=c_mask)[:, None]
    if PATHS > 2:
        y += tl.load(x2_ptr + offsets, mask=mask, other=0).to(acc_ty) * tl.load(w_ptr + 2 * NC + stat, mask=c_mask)[:, None]
    if PATHS > 3:
        y += tl.load(x3_ptr + offsets, mask=mask, other=0).to(acc_ty) * tl.load(w_ptr + 3 * NC + stat, mask=c_mask)[:, None]
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_apply_kernel(
    dy_ptr, w_ptr, bias_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr,
    N, C, HW, stride_n, stride_c, stride_hw,
    PATHS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets, mask, stat, c_mask = _tile(pid, C, HW, stride_n, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    acc_ty = w_ptr.dtype.element_ty
    out_ty = out0_ptr.dtype.element_ty
    NC = N * C
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty)
    bias = tl.load(bias_ptr + stat, mask=c_mask)[:, None]
    tl.store(out0_ptr + offsets, (dy * tl.load(w_ptr + stat, mask=c_mask)[:, None] + bias).to(out_ty), mask=mask)
    if PATHS > 1:
        w = tl.load(w_ptr + NC + stat, mask=c_mask)[:, None]
        tl.store(out1_ptr + offsets, (dy * w + bias).to(out_ty), mask=mask)
    if PATHS > 2:
        w = tl.load(w_ptr + 2 * NC + stat, mask=c_mask)[:, None]
        tl.store(out2_ptr + offsets, (dy * w + bias).to(out_ty), mask=mask)
    if PATHS > 3:
        w = tl.load(w_ptr + 3 * NC + stat, mask=c_mask)[:, None]
        tl.store(out3_ptr + offsets, (dy * w + bias).to(out_ty), mask=mask)


@triton.jit
def _grad_reduce_kernel(
    dy_ptr, x0_ptr, x1_ptr, x2_ptr, x3_ptr, dots_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    PATHS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, channel tile, split of H*W); dots[split, p, n, c] = its share of sum dy*x_p.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = n * stride_n + c[:, None] * stride_c
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    acc_ty = dots_ptr.dtype.element_ty
    acc0 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    acc1 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    acc2 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    acc3 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < hw_end)[None, :]
        offsets = base + hw[None, :] * stride_hw
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0).to(acc_ty)
        acc0 += dy * tl.load(x0_ptr + offsets, mask=mask, other=0).to(acc_ty)
        if PATHS > 1:
            acc1 += dy * tl.load(x1_ptr + offsets, mask=mask, other=0).to(acc_ty)
        if PATHS > 2:
            acc2 += dy * tl.load(x2_ptr + offsets, mask=mask, other=0).to(acc_ty)
        if PATHS > 3:
            acc3 += dy * tl.load(x3_ptr + offsets, mask=mask, other=0).to(acc_ty)
    out = (split * PATHS * N + n) * C + c
    NC = N * C
    tl.store(dots_ptr + out, tl.sum(acc0, axis=1), mask=c_mask)
    if PATHS > 1:
        tl.store(dots_ptr + out + NC, tl.sum(acc1, axis=1), mask=c_mask)
    if PATHS > 2:
        tl.store(dots_ptr + out + 2 * NC, tl.sum(acc2, axis=1), mask=c_mask)
    if PATHS > 3:
        tl.store(dots_ptr + out + 3 * NC, tl.sum(acc3, axis=1), mask=c_mask)


def _elementwise_launch(a: torch.Tensor):
    """(grid, launch options) of an elementwise kernel over a: one program per (n, C tile, H*W tile)."""
    N, C, H, W = a.shape
    block_c, block_hw = tile_shape(a)
    grid = (N * triton.cdiv(C, block_c) * triton.cdiv(H * W, block_hw),)
    return grid, dict(BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=tile_warps(block_c * block_hw, a.dtype))


def path_mix(paths: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    op = "path_mix"
    _check_paths(op, paths)
    x = paths[0]
    N, C, H, W = x.shape
    check_stats(op, x, (len(paths), N, C), weights=weights)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    grid, options = _elementwise_launch(x)
    with device_guard(x):
        _mix_kernel[grid](*_padded(paths), weights, out, N, C, H * W, *strides(x), PATHS=len(paths), **options)
    return out


def path_grad_reduce(dy: torch.Tensor, paths: List[torch.Tensor]) -> torch.Tensor:
    op = "path_grad_reduce"
    check_activation(op, "dy", dy)
    _check_paths(op, paths, like=dy)
    N, C, H, W = dy.shape
    P = len(paths)
    acc = acc_dtype(dy.dtype)
    if dy.numel() == 0:
        return dy.new_zeros((P, N, C), dtype=acc)
    block_c, block_hw = tile_shape(dy)
    tiles, splits, per_split = split_hw(dy, block_c, block_hw)
    dots = torch.empty((splits, P, N, C), dtype=acc, device=dy.device)
    with device_guard(dy):
        _grad_reduce_kernel[(tiles, splits)](
            dy, *_padded(paths), dots, N, C, H * W, *strides(dy), per_split,
            PATHS=P, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=tile_warps(block_c * block_hw, dy.dtype),
        )
    return dots[0] if splits == 1 else dots.sum(0)


def path_grad_apply(dy: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    op = "path_grad_apply"
    check_activation(op, "dy", dy)
    N, C, H, W = dy.shape
    P = weights.shape[0] if weights.dim() == 3 else 0
    if not 1 <= P <= MAX_PATHS:
        raise ValueError(f"{op}(): argument 'weights' must be (P, N, C) with 1 <= P <= {MAX_PATHS}, got {tuple(weights.shape)}")
    check_stats(op, dy, (P, N, C), weights=weights)
    check_stats(op, dy, (N, C), bias=bias)
    outs = [torch.empty_like(dy) for _ in range(P)]
    if dy.numel() == 0:
        return outs
    grid, options = _elementwise_launch(dy)
    with device_guard(dy):
        _grad_apply_kernel[grid](dy, weights, bias, *_padded(outs), N, C, H * W, *strides(dy), PATHS=P, **options)
    return outs
