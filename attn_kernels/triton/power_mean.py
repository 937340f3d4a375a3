"""The channel power mean in Triton (attention transfer):

  channel_power_mean(x, p) -> m                    reads x:
      m[n, hw] = mean over C of |x|^p                       (N, H*W), accumulator dtype
  channel_power_mean_backward(dm, x, p) -> dx      reads x, writes dx:
      dx = dm[n, hw] * p * |x|^(p - 1) * sign(x) / C

p >= 1 (|x|^p has no derivative at 0 below); p = 2 (the paper's) and p = 1 run exact special
cases, other p go through exp2/log2 with p rounded to float32.
A program takes a tile of pixels and loops over C, which is split across programs where N and
the pixel tiles alone would not fill the GPU (32 programs at 2048x7x7, N = 32, NCHW), by
spatial_gate's rule: the backward's splits each write their own channels of dx, the forward's
partial sums are folded in split order. No atomics: bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from .channel_gate import check_activation, check_stats, device_guard, strides, tile_warps
from .spatial_gate import combine_c_splits, split_c, tile_shape_over_c


@triton.jit
def _power(ax, p, POWER: tl.constexpr):
    # |x|^p for ax = |x| >= 0. POWER: 2, 1, or 0 for any other p.
    if POWER == 2:
        return ax * ax
    elif POWER == 1:
        return ax
    else:
        return _general_power(ax, p)


@triton.jit
def _general_power(ax, q):
    """ax^q for ax >= 0 and q >= 0 (0^0 = 1), through exp2/log2 without taking log2(0)."""
    positive = ax > 0
    power = tl.exp2(q * tl.log2(tl.where(positive, ax, 1.0)))
    return tl.where(positive, power, 1.0 if q == 0 else 0.0)


@triton.jit
def _power_mean_kernel(
    x_ptr, dm_ptr, out_ptr, N, C, HW, stride_n, stride_c, stride_hw, c_per_split, divisor, p,
    GRAD: tl.constexpr, POWER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, pixel tile, split of C), looping over its channels. GRAD=False:
    # out[split, n, hw] = sum over the split's c of |x|^p, / divisor. GRAD=True: out = dx, the
    # elementwise gradient, given dm.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    n = pid // hw_tiles
    hw = (pid % hw_tiles) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = hw < HW
    c_begin = split * c_per_split
    c_end = tl.minimum(C, c_begin + c_per_split)
    acc_ty = dm_ptr.dtype.element_ty
    if GRAD:
        scale = tl.load(dm_ptr + n * HW + hw, mask=hw_mask, other=0) * p / C
    else:
        total = tl.zeros((BLOCK_HW,), dtype=acc_ty)
    for c0 in range(c_begin, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < c_end)[:, None] & hw_mask[None, :]
        offsets = n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
        x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
        ax = tl.abs(x)
        if GRAD:
            if POWER == 2:
                d = x  # p * |x| * sign(x) / p
            elif POWER == 1:
                d = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(acc_ty)
            else:
                d = _general_power(ax, p - 1) * tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(acc_ty)
            tl.store(out_ptr + offsets, (d * scale[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            total += tl.sum(tl.where(mask, _power(ax, p, POWER), 0.0), axis=0)
    if not GRAD:
        tl.store(out_ptr + (split * N + n) * HW + hw, total / divisor, mask=hw_mask)


def _power_flag(p: float) -> int:
    return 2 if p == 2 else 1 if p == 1 else 0


def _check_p(op: str, p: float):
    if not p >= 1:
        raise ValueError(f"{op}(): argument 'p' must be >= 1, got {p}")


def _launch(x, dm, out, p: float):
    """_power_mean_kernel over x, C split by split_c: with dm, the gradient into out (x's shape);
    without, the mean into out (N, H*W), through the splits' partial sums where there are several."""
    N, C, H, W = x.shape
    HW = H * W
    grad = dm is not None
    block_c, block_hw = tile_shape_over_c(x)
    hw_tiles = triton.cdiv(HW, block_hw)
    splits, c_per_split = split_c(x, block_c, N * hw_tiles)
    folded = not grad and splits > 1
    target = torch.empty((splits, N, HW), dtype=out.dtype, device=x.device) if folded else out
    with device_guard(x):
        _power_mean_kernel[(N * hw_tiles, splits)](
            x, dm if grad else target, target, N, C, HW, *strides(x), c_per_split,
            1.0 if grad or folded else float(C), float(p),
            GRAD=grad, POWER=_power_flag(p), BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=tile_warps(block_c * block_hw, x.dtype),
        )
        if folded:
            combine_c_splits([target], [out], float(C))


def channel_power_mean(x: torch.Tensor, p: float) -> torch.Tensor:
    op = "channel_power_mean"
    check_activation(op, "x", x)
    _check_p(op, p)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty((N, H * W), dtype=acc, device=x.device)
    if x.numel() == 0:
        return out.zero_()
    _launch(x, None, out, p)
    return out


def channel_power_mean_backward(dm: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    op = "channel_power_mean_backward"
    check_activation(op, "x", x)
    _check_p(op, p)
    N, C, H, W = x.shape
    check_stats(op, x, (N, H * W), dm=dm)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    _launch(x, dm, dx, p)
    return dx
