"""Channel-gate primitives in Triton, with the signatures of the CUDA ones (csrc/channel_gate.cu).

  channel_pool(x, with_max) -> (mean, max)                 one read of x
      (max NaN where the plane holds a NaN, as torch.amax)
  channel_grad_reduce(dy, x, xmax, with_dy_sum) -> (dot, ties, dy_sum)
                                                           one read of dy and x:
      sum over H*W of dy*x, how many x tie xmax (with xmax), and sum of dy (with with_dy_sum)
  channel_gate_apply(a, gate, bias, x, xmax, tie_coef)     one read of a (and x), one write:
      out = a*gate[n,c] + bias[n,c] + (x == xmax[n,c]) * tie_coef[n,c]

Statistics are (N, C) tensors in the accumulator dtype (float32; float64 for float64 input).
Kernels address x through its (n, c, h*w) strides, so contiguous NCHW and channels_last are both
read where they lie; Triton specializes the unit stride, which makes either layout coalesced.
Reductions are split over H*W into a fixed number of chunks whose partial results are summed in a
fixed order: no atomics, bitwise reproducible.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from ..ops.primitives import acc_dtype
from .launch import launch

# Programs a reduction grid aims for before it splits H*W; tests raise it to exercise splitting.
TARGET_PROGRAMS_PER_SM = 4
_TILE_ELEMENTS = 2048  # elements of x a program holds per loop step


def cdiv(a: int, b: int) -> int:
    """Plain-Python ceil division for the host side (triton.cdiv is a ConstexprFunction, ~3 us a
    call from the host in triton 3.7)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Plain-Python triton.next_power_of_2, for the host side (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def strides(t: torch.Tensor):
    """(stride_n, stride_c, stride_hw) of a 4-D tensor whose H and W fold into one dimension."""
    n, c, h, w = t.stride()
    return n, c, h if t.shape[3] == 1 else w


def check_activation(op: str, name: str, t: torch.Tensor, like: torch.Tensor = None):
    if t.dim() != 4:
        raise ValueError(f"{op}(): argument '{name}' must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{op}(): argument '{name}' must be contiguous NCHW or channels_last, got strides {t.stride()}")
    if t.numel() and t.shape[2] * t.shape[3] == 0:
        raise ValueError(f"{op}(): argument '{name}' must have H*W >= 1 to pool over, got shape {tuple(t.shape)}")
    if like is None:
        return
    # Strides of size-1 dimensions never move an address, so only the others must agree.
    same_order = t.numel() == 0 or all(a == b for a, b, size in zip(t.stride(), like.stride(), t.shape) if size > 1)
    if t.shape != like.shape or t.dtype != like.dtype or not same_order:
        raise ValueError(
            f"{op}(): argument '{name}' must match the activation in shape, dtype and strides; got "
            f"{tuple(t.shape)} {t.dtype} {t.stride()} vs {tuple(like.shape)} {like.dtype} {like.stride()}"
        )


def check_stats(op: str, a: torch.Tensor, shape: tuple, **stats):
    """Per-(n, c) or per-(n, h*w) statistics: contiguous, in a's accumulator dtype, on a's device."""
    acc = acc_dtype(a.dtype)
    for name, stat in stats.items():
        if stat is not None and (tuple(stat.shape) != shape or stat.dtype != acc or not stat.is_contiguous()
                                 or stat.device != a.device):
            raise ValueError(
                f"{op}(): argument '{name}' must be a contiguous {acc} tensor of shape {shape} on {a.device}, "
                f"got {tuple(stat.shape)} {stat.dtype} on {stat.device}"
            )


def tile_shape(t: torch.Tensor):
    """(BLOCK_C, BLOCK_HW): long along whichever of C and H*W is contiguous in memory."""
    C, HW = t.shape[1], t.shape[2] * t.shape[3]
    channels_last = not t.is_contiguous()
    if channels_last:
        block_c = min(next_power_of_2(C), 256)
        block_hw = min(next_power_of_2(HW), max(1, _TILE_ELEMENTS // block_c))
    else:
        block_hw = min(next_power_of_2(HW), 1024)
        block_c = min(next_power_of_2(C), max(1, _TILE_ELEMENTS // block_hw))
    return block_c, block_hw


def tile_warps(elements: int, dtype: torch.dtype) -> int:
    """Warps for a program that holds `elements` of each tile-shaped value per step (x's tile, its
    accumulators) for input of `dtype`: 16 registers of each per thread, values counted in the
    accumulator dtype (16 float32, 8 float64), 4 to 16 warps. Compiled for sm_90a at ResNet-50's
    shapes, the 2048-element tiles take 4 warps (at most 128 registers, no spills in bf16 and
    float32); in float64 4 warps took up to 254 registers and spilled in the gate apply, the
    spatial reduction and the power mean, 8 warps none (at most 128 registers)."""
    registers = elements * acc_dtype(dtype).itemsize // 4
    return max(4, min(16, registers // 512))


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's, where it is not already (entering
    and leaving a guard costs about 4 us of host time; asking the current device, about 1)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def sm_count(t: torch.Tensor) -> int:
    """The SMs a launch sizes its grid for: the GPU's; on CPU tensors (Triton's interpreter) 1, or
    ATTN_KERNELS_INTERPRETER_SMS (the ledger sets an H100's 132, to count the launches a GPU runs)."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return int(os.environ.get("ATTN_KERNELS_INTERPRETER_SMS", "1"))


# NaN-propagating maxima, as torch.amax: compiled tl.max and a plain tl.maximum drop NaN (LLVM's
# maxnum), so every maximum of these kernels goes through the two helpers below.
@triton.jit
def nan_maximum(a, b):
    """Elementwise max of a and b, NaN where either is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _flip_negatives(bits, SIGN_SHIFT: tl.constexpr, MAGNITUDE: tl.constexpr):
    """Float bits as signed integers in the order of the floats: the magnitude bits of negative
    floats flipped. Its own inverse."""
    return bits ^ ((bits >> SIGN_SHIFT) & MAGNITUDE)


@triton.jit
def nan_max(x, axis: tl.constexpr):
    """Max of a float32 or float64 tensor over axis, NaN where any element is NaN (torch.amax's).
    The floats are reduced as order-preserving integer keys, NaN's above +inf's: an integer max is
    exact, and NaN-free. (A tl.reduce with nan_maximum as combine function computes the same, but
    Triton's interpreter runs it element by element.)"""
    if x.dtype == tl.float64:
        key = _flip_negatives(x.to(tl.int64, bitcast=True), 63, 0x7FFFFFFFFFFFFFFF)
        best = tl.max(tl.where(x != x, 0x7FFFFFFFFFFFFFFF, key), axis=axis)
        return _flip_negatives(best, 63, 0x7FFFFFFFFFFFFFFF).to(tl.float64, bitcast=True)
    else:
        key = _flip_negatives(x.to(tl.int32, bitcast=True), 31, 0x7FFFFFFF)
        best = tl.max(tl.where(x != x, 0x7FFFFFFF, key), axis=axis)
        return _flip_negatives(best, 31, 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _reduce_kernel(
    a_ptr, b_ptr, xmax_ptr, first_ptr, second_ptr,
    N, C, HW, stride_n, stride_c, stride_hw, hw_per_split,
    GRAD: tl.constexpr, SECOND: tl.constexpr, SUM_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # GRAD=False: first = sum(a), second = max(a).  GRAD=True: first = sum(a*b), second =
    # count(b == xmax[n, c]), or sum(a) with SUM_A. One program per (n, channel tile, split of H*W).
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    c_tiles = tl.cdiv(C, BLOCK_C)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    base = n * stride_n + c[:, None] * stride_c
    hw_begin = split * hw_per_split
    hw_end = tl.minimum(HW, hw_begin + hw_per_split)
    acc_ty = first_ptr.dtype.element_ty

    first = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
    if GRAD:
        second = tl.zeros((BLOCK_C, BLOCK_HW), dtype=acc_ty)
        if SECOND and not SUM_A:
            ref = tl.load(xmax_ptr + n * C + c, mask=c_mask, other=0)[:, None]
    else:
        second = tl.full((BLOCK_C, BLOCK_HW), float("-inf"), dtype=acc_ty)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < hw_end)[None, :]
        offsets = base + hw[None, :] * stride_hw
        a = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
        if GRAD:
            b = tl.load(b_ptr + offsets, mask=mask, other=0).to(acc_ty)
            first += a * b
            if SUM_A:
                second += a
            elif SECOND:
                second += tl.where(mask & (b == ref), 1.0, 0.0).to(acc_ty)
        else:
            first += a
            if SECOND:
                second = nan_maximum(second, tl.where(mask, a, float("-inf")))

    out = split * N * C + n * C + c
    tl.store(first_ptr + out, tl.sum(first, axis=1), mask=c_mask)
    if SECOND:
        if GRAD:
            tl.store(second_ptr + out, tl.sum(second, axis=1), mask=c_mask)
        else:
            tl.store(second_ptr + out, nan_max(second, 1), mask=c_mask)


def split_hw(a: torch.Tensor, block_c: int, block_hw: int):
    """(tiles, splits, hw_per_split) of a reduction over H*W with one program per (n, channel tile,
    split): H*W is split until the grid fills the GPU, in chunks of whole BLOCK_HW tiles."""
    N, C, H, W = a.shape
    HW = H * W
    tiles = N * cdiv(C, block_c)
    want = cdiv(TARGET_PROGRAMS_PER_SM * sm_count(a), tiles)
    splits = max(1, min(want, cdiv(HW, block_hw)))
    per_split = cdiv(cdiv(HW, splits), block_hw) * block_hw
    return tiles, cdiv(HW, per_split), per_split


def _reduce(a, b, xmax, grad: bool, second: bool, sum_a: bool = False):
    N, C, H, W = a.shape
    HW = H * W
    acc = acc_dtype(a.dtype)
    block_c, block_hw = tile_shape(a)
    tiles, splits, per_split = split_hw(a, block_c, block_hw)
    first = torch.empty((splits, N, C), dtype=acc, device=a.device)
    second_out = torch.empty((splits, N, C) if second else (0,), dtype=acc, device=a.device)
    with device_guard(a):
        _reduce_kernel[(tiles, splits)](
            a, b if grad else a, xmax if xmax is not None else first, first, second_out if second else first,
            N, C, HW, *strides(a), per_split,
            GRAD=grad, SECOND=second, SUM_A=sum_a, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=tile_warps(block_c * block_hw, a.dtype),
        )
    if splits == 1:
        return first[0], second_out[0] if second else second_out
    if second:
        second_out = second_out.sum(0) if grad else second_out.amax(0)
    return first.sum(0), second_out


def channel_pool(x: torch.Tensor, with_max: bool):
    check_activation("channel_pool", "x", x)
    N, C = x.shape[:2]
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return x.new_zeros((N, C), dtype=acc), x.new_zeros((N, C) if with_max else (0,), dtype=acc)
    total, xmax = _reduce(x, None, None, grad=False, second=with_max)
    return total / (x.shape[2] * x.shape[3]), xmax


def channel_grad_reduce(dy: torch.Tensor, x: torch.Tensor, xmax=None, with_dy_sum: bool = False):
    op = "channel_grad_reduce"
    check_activation(op, "x", x)
    check_activation(op, "dy", dy, like=x)
    N, C = x.shape[:2]
    check_stats(op, x, (N, C), xmax=xmax)
    if xmax is not None and with_dy_sum:
        raise ValueError(f"{op}(): arguments 'xmax' and 'with_dy_sum' cannot be used together")
    acc = acc_dtype(x.dtype)
    empty = x.new_empty((0,), dtype=acc)
    if x.numel() == 0:
        zeros = x.new_zeros((N, C), dtype=acc)
        return zeros, zeros.clone() if xmax is not None else empty, zeros.clone() if with_dy_sum else empty.clone()
    dot, second = _reduce(dy, x, xmax, grad=True, second=xmax is not None or with_dy_sum, sum_a=with_dy_sum)
    return (dot, second, empty) if not with_dy_sum else (dot, empty, second)


@triton.jit
def _gate_apply_kernel(
    a_ptr, gate_ptr, bias_ptr, x_ptr, xmax_ptr, tie_ptr, out_ptr,
    C, HW, stride_n, stride_c, stride_hw, stat_plane,
    HAS_BIAS: tl.constexpr, HAS_TIES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    # One program per (n, channel tile, H*W tile); the per-(n, c) values are loaded once per tile.
    # bias and tie sit stat_plane and 2 * stat_plane elements past their pointers (0 for separate
    # tensors; N*C when gate, bias and tie are the planes of one (3, N, C) tensor).
    pid = tl.program_id(0).to(tl.int64)
    hw_tiles = tl.cdiv(HW, BLOCK_HW)
    c_tiles = tl.cdiv(C, BLOCK_C)
    hw_tile = pid % hw_tiles
    c_tile = (pid // hw_tiles) % c_tiles
    n = pid // (hw_tiles * c_tiles)
    c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = hw_tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    offsets = n * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
    stat = n * C + c
    acc_ty = gate_ptr.dtype.element_ty

    a = tl.load(a_ptr + offsets, mask=mask, other=0).to(acc_ty)
    out = a * tl.load(gate_ptr + stat, mask=c_mask, other=0)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + stat_plane + stat, mask=c_mask, other=0)[:, None]
    if HAS_TIES:
        x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_ty)
        xmax = tl.load(xmax_ptr + stat, mask=c_mask, other=0)[:, None]
        tie = tl.load(tie_ptr + 2 * stat_plane + stat, mask=c_mask, other=0)[:, None]
        out += tl.where(x == xmax, tie, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


_apply_plans = {}


def launch_gate_apply(a, gate, bias=None, x=None, xmax=None, tie_coef=None, stat_plane: int = 0):
    """out = a*gate + bias + (x == xmax)*tie_coef, unchecked (channel_gate_apply checks); the grid
    cached per shape, strides, dtype and device."""
    key = (*a.shape, *a.stride(), a.dtype, a.device)  # plain ints: torch.Size compares through sym_eq
    plan = _apply_plans.get(key)
    if plan is None:
        N, C, H, W = a.shape
        block_c, block_hw = tile_shape(a)
        plan = ((N * cdiv(C, block_c) * cdiv(H * W, block_hw),), block_c, block_hw,
                tile_warps(block_c * block_hw, a.dtype))
        _apply_plans[key] = plan
    grid, block_c, block_hw, warps = plan
    out = torch.empty_like(a)
    if a.numel() == 0:
        return out
    ties = xmax is not None
    with device_guard(a):
        launch(_gate_apply_kernel, grid,
               (a, gate, bias if bias is not None else gate, x if ties else a, xmax if ties else gate,
                tie_coef if ties else gate, out),
               (a.shape[1], a.shape[2] * a.shape[3], *strides(a), stat_plane),
               dict(HAS_BIAS=bias is not None, HAS_TIES=ties, BLOCK_C=block_c, BLOCK_HW=block_hw), warps)
    return out


def channel_gate_apply(a, gate, bias=None, x=None, xmax=None, tie_coef=None):
    op = "channel_gate_apply"
    check_activation(op, "a", a)
    ties = xmax is not None
    if ties != (tie_coef is not None) or ties != (x is not None):
        raise ValueError(f"{op}(): arguments 'x', 'xmax' and 'tie_coef' must be given together or not at all")
    if ties and bias is None:
        raise ValueError(f"{op}(): argument 'bias' is required when 'xmax' is given")
    if ties:
        check_activation(op, "x", x, like=a)
    N, C = a.shape[:2]
    check_stats(op, a, (N, C), gate=gate, bias=bias, xmax=xmax, tie_coef=tie_coef)
    return launch_gate_apply(a, gate, bias, x, xmax, tie_coef)
