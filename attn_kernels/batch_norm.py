"""The BatchNorms inside fused blocks (CBAM's spatial BatchNorm, Selective Kernel's): their batch
statistics, their running statistics, and their synchronization over processes when the module
is an `nn.SyncBatchNorm` (`nn.SyncBatchNorm.convert_sync_batchnorm(model)`, before or after
`attn_kernels.patch`).

As `nn.SyncBatchNorm.forward`, a BatchNorm synchronizes in training when torch.distributed is
initialized and its process group (the default one unless it names another) has more than one
process. Then, where a plain BatchNorm takes the statistics of its own batch, these functions
take those of the whole group's:
- forward: one all-reduce of the count and the per-channel sum and sum of squares, in float64 (a
  few bytes per channel; nn.SyncBatchNorm all-gathers a mean, an invstd and a count per process);
- backward, in training: one all-reduce of the two per-channel sums the gradient through the batch
  statistics needs (of dnormalized and of dnormalized * normalized).
The affine gradients stay each process's own sums, as nn.SyncBatchNorm's: data parallelism (DDP,
FSDP) reduces them with the other parameters' gradients. The running statistics move towards the
group's mean and its variance with Bessel's correction over the group's count.

Every process of the group calls these in the same order, also one with an empty batch (count
0), which contributes zeros. The ops of attn_kernels.ops take the group by name (a string fits
an op schema): `group_name(bn)` gives it, '' meaning no synchronization.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def group_name(bn: nn.Module) -> str:
    """The name of the process group `bn` synchronizes its statistics over in this call, or ''
    (a plain BatchNorm, eval, torch.distributed not initialized, or a group of one process)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training or not dist.is_available() or not dist.is_initialized():
        return ""
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else ""


def _all_reduce(t: Tensor, name: str) -> Tensor:
    from torch.distributed.distributed_c10d import _resolve_process_group

    dist.all_reduce(t, group=_resolve_process_group(name))
    return t


def batch_moments(z: Tensor, dims: Sequence[int], name: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(count, mean, biased variance) of z over `dims`, one mean and variance per remaining
    channel, over the batches of the whole group `name` ('' for z's alone). count is a float64
    (1,) tensor; mean and variance are in z's dtype."""
    shape = [size for d, size in enumerate(z.shape) if d not in dims]  # one value per channel
    count = z.new_full((1,), z.numel() // max(math.prod(shape), 1), dtype=torch.float64)
    if not name:
        return count, z.mean(dims), z.var(dims, unbiased=False)
    z64 = z.double()
    stats = _all_reduce(torch.cat((count, z64.sum(dims).flatten(), (z64 * z64).sum(dims).flatten())), name)
    count, sums = stats[:1], stats[1:].view(2, -1)
    mean = sums[0] / count
    # Sums of float64 squares: their cancellation stays far below z's own precision (float32 at most).
    var = (sums[1] / count - mean * mean).clamp_min(0)
    return count, mean.view(shape).to(z.dtype), var.view(shape).to(z.dtype)


def training_input_grad(dnormalized: Tensor, normalized: Tensor, invstd: Tensor, dims: Sequence[int], count: Tensor,
                        name: str) -> Tensor:
    """BatchNorm's input gradient in training, where the batch statistics depend on the input too:
    invstd * (dnormalized - mean(dnormalized) - normalized * mean(dnormalized * normalized)), the
    means per channel over `dims` and over the group's batch (invstd broadcast against them)."""
    if not name:
        mean_d, mean_dn = dnormalized.mean(dims, keepdim=True), (dnormalized * normalized).mean(dims, keepdim=True)
    else:
        first, second = dnormalized.sum(dims, keepdim=True), (dnormalized * normalized).sum(dims, keepdim=True)
        sums = _all_reduce(torch.cat((first.double().flatten(), second.double().flatten())), name) / count
        mean_d = sums[: first.numel()].view(first.shape).to(first.dtype)
        mean_dn = sums[first.numel():].view(first.shape).to(first.dtype)
    return invstd * (dnormalized - mean_d - normalized * mean_dn)


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor], batch_mean: Tensor,
                         batch_var: Tensor, count: Tensor, momentum: float) -> None:
    """As F.batch_norm in training: the running statistics (when tracked) move towards the batch's
    mean and its variance with Bessel's correction (batch_var is the biased one, count the number
    of values per channel it was taken over)."""
    if running_mean is None or running_var is None:
        return
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
        unbiased = batch_var.double() * (count / (count - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class _SyncedBatchNorm(torch.autograd.Function):
    """BatchNorm in training over the group's batch, for (N, C, H, W) x: the reference path's."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, name):
        count, mean, var = batch_moments(x, (0, 2, 3), name)
        invstd = torch.rsqrt(var + eps)
        normalized = (x - mean[:, None, None]) * invstd[:, None, None]
        ctx.save_for_backward(normalized, weight, invstd, count)
        ctx.name = name
        ctx.mark_non_differentiable(mean, var, count)
        return normalized * weight[:, None, None] + bias[:, None, None], mean, var, count

    @staticmethod
    def backward(ctx, dy, *_):
        normalized, weight, invstd, count = ctx.saved_tensors
        dims = (0, 2, 3)
        dweight, dbias = (dy * normalized).sum(dims), dy.sum(dims)
        dnormalized = dy * weight[:, None, None]
        dx = training_input_grad(dnormalized, normalized, invstd[:, None, None], dims, count, ctx.name)
        return dx, dweight, dbias, None, None


def batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
               bias: Optional[Tensor], training: bool, momentum: float, eps: float, group: str = "") -> Tensor:
    """F.batch_norm, over the batches of the process group named `group` in training when it is
    not '' (then with affine weight and bias)."""
    if not (training and group):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if weight is None or bias is None:  # affine=False
        weight, bias = x.new_ones(x.shape[1]), x.new_zeros(x.shape[1])
    y, mean, var, count = _SyncedBatchNorm.apply(x, weight, bias, eps, group)
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def module_tensors(bn: nn.BatchNorm2d) -> dict:
    """The statistics and affine parameters F.batch_norm gets from nn.BatchNorm2d.forward, and the
    process group an nn.SyncBatchNorm synchronizes them over (attn_kernels.batch_norm)."""
    track = not bn.training or bn.track_running_stats
    return {
        "bn_running_mean": bn.running_mean if track else None,
        "bn_running_var": bn.running_var if track else None,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "bn_training": bn.training or (bn.running_mean is None and bn.running_var is None),
        "bn_group": group_name(bn),
    }


def module_arguments(bn: nn.BatchNorm2d) -> dict:
    """All of F.batch_norm's arguments for this batch, counting it as nn.BatchNorm2d.forward does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return {**module_tensors(bn), "bn_momentum": momentum, "bn_eps": bn.eps}
