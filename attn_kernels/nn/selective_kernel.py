"""Selective Kernel drop-ins: timm's SelectiveKernel and its SelectiveKernelAttn."""
from typing import Optional, Type, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import batch_norm
from ..activations import create_act_layer
from ..backends import Dispatch
from ..ops.primitives import acc_dtype
from .module import FusedModule, make_divisible


class FusedSelectiveKernelAttn(FusedModule):
    """Selective Kernel attention, a drop-in for timm.layers.SelectiveKernelAttn (same arguments
    and state_dict): the path weights softmax_p(fc_select(act(bn(fc_reduce(mean_hw(sum_p x)))))),
    (B, P, C, 1, 1), of stacked paths x (B, P, C, H, W).

    No kernel of its own: it pools each path over H*W first (torch.mean in float32, one read of
    x, where timm's sum then mean reads it twice and writes a sum) and adds the (B, P, C) means;
    backward writes x's gradient once. Inside FusedSelectiveKernel, the whole attention and the
    weighted sum are one fused op instead."""

    def __init__(self, channels: int, num_paths: int = 2, attn_channels: int = 32,
                 act_layer: Union[str, Type[nn.Module]] = nn.ReLU, norm_layer: Type[nn.Module] = nn.BatchNorm2d,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_paths = num_paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, kernel_size=1, bias=False, **dd)
        self.bn = norm_layer(attn_channels, **dd)
        self.act = create_act_layer(act_layer, inplace=True, argument="act_layer")
        self.fc_select = nn.Conv2d(attn_channels, channels * num_paths, kernel_size=1, bias=False, **dd)

    def reference_forward(self, x: Tensor) -> Tensor:
        s = self.fc_select(self.act(self.bn(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True)))))
        B, PC, H, W = s.shape
        return torch.softmax(s.view(B, self.num_paths, PC // self.num_paths, H, W), dim=1)

    def fused_forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.num_paths:
            raise ValueError(f"x must be the stacked paths (B, {self.num_paths}, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        pooled = torch.mean(x, (3, 4), dtype=acc_dtype(x.dtype)).sum(1).to(x.dtype)[..., None, None]
        h = self.fc_reduce(pooled)
        if isinstance(self.bn, nn.modules.batchnorm._BatchNorm):
            # As self.bn(h), also for an nn.SyncBatchNorm on CPU tensors (attn_kernels.batch_norm).
            a = batch_norm.module_arguments(self.bn)
            h = batch_norm.batch_norm(h, a["bn_running_mean"], a["bn_running_var"], a["bn_weight"], a["bn_bias"],
                                      a["bn_training"], a["bn_momentum"], a["bn_eps"], a["bn_group"])
        else:
            h = self.bn(h)
        logits = self.fc_select(self.act(h))
        B, PC = logits.shape[:2]
        return torch.softmax(logits.view(B, self.num_paths, PC // self.num_paths, 1, 1), dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.fc_reduce.in_channels}, num_paths={self.num_paths}, attn_channels={self.fc_reduce.out_channels}"


class FusedSelectiveKernel(FusedModule):
    """Selective Kernel convolution, a drop-in for timm.layers.SelectiveKernel (same arguments and
    state_dict; its branches are timm's ConvNormAct, so timm must be installed).

    The branch convs run as they are (cuDNN); everything after them (the sum of the branches, the
    pooling, FC-BN-ReLU-FC, the softmax across the branches and the weighted sum) is one fused op,
    forward and backward (attn_kernels/ops/selective_kernel.py), with the weights of .attn."""

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        kernel_size=None,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 8,
        keep_3x3: bool = True,
        split_input: bool = True,
        act_layer=nn.ReLU,
        norm_layer=nn.BatchNorm2d,
        aa_layer=None,
        drop_layer=None,
        device=None,
        dtype=None,
    ):
        try:
            from timm.layers import ConvNormAct
        except ImportError as e:
            raise ImportError("FusedSelectiveKernel builds its branches with timm's ConvNormAct: pip install timm") from e
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        out_channels = out_channels or in_channels
        kernel_size = kernel_size or [3, 5]  # timm's default: a 3x3 and a 5x5 branch (3x3 dilated 2 with keep_3x3)
        if not isinstance(kernel_size, list):
            kernel_size = [kernel_size] * 2
        if any(not isinstance(k, int) or k < 3 or k % 2 == 0 for k in kernel_size):
            raise ValueError(f"kernel_size must be odd ints >= 3, got {kernel_size!r}")
        if keep_3x3:
            dilation = [dilation * (k - 1) // 2 for k in kernel_size]
            kernel_size = [3] * len(kernel_size)
        else:
            dilation = [dilation] * len(kernel_size)
        self.num_paths = len(kernel_size)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.split_input = split_input
        if split_input:
            if in_channels % self.num_paths:
                raise ValueError(f"in_channels ({in_channels}) must divide into {self.num_paths} paths with split_input")
            in_channels = in_channels // self.num_paths
        groups = min(out_channels, groups)
        conv_kwargs = dict(stride=stride, groups=groups, act_layer=act_layer, norm_layer=norm_layer,
                           aa_layer=aa_layer, drop_layer=drop_layer, **dd)
        self.paths = nn.ModuleList([ConvNormAct(in_channels, out_channels, kernel_size=k, dilation=d, **conv_kwargs)
                                    for k, d in zip(kernel_size, dilation)])
        attn_channels = rd_channels or make_divisible(out_channels * rd_ratio, divisor=rd_divisor)
        self.attn = FusedSelectiveKernelAttn(out_channels, self.num_paths, attn_channels, **dd)

    def _branches(self, x: Tensor):
        if self.split_input:
            x_split = torch.split(x, self.in_channels // self.num_paths, 1)
            return [op(x_split[i]) for i, op in enumerate(self.paths)]
        return [op(x) for op in self.paths]

    def reference_forward(self, x: Tensor) -> Tensor:
        if self.split_input:
            x_split = torch.split(x, self.in_channels // self.num_paths, 1)
            x_paths = [op(x_split[i]) for i, op in enumerate(self.paths)]
        else:
            x_paths = [op(x) for op in self.paths]
        x = torch.stack(x_paths, dim=1)
        return torch.sum(x * self.attn(x), dim=1)

    def fused_forward(self, x: Tensor) -> Tensor:
        attn = self.attn
        return F.selective_kernel(self._branches(x), attn.fc_reduce.weight, attn.fc_select.weight,
                                  **batch_norm.module_arguments(attn.bn), act=attn.act)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend the attention of forward(x) runs on, and why each backend before it was
        passed over (judged on stand-ins for the branch outputs: x's batch, dtype and device)."""
        stand_ins = [x.new_empty((x.shape[0], self.out_channels, 1, 1)) for _ in range(self.num_paths)]
        attn = self.attn
        return F.selective_kernel_dispatch(stand_ins, attn.fc_reduce.weight, attn.fc_select.weight,
                                           **batch_norm.module_tensors(attn.bn), act=attn.act)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_paths={self.num_paths}"


# --- YOLOv4 SAM and Residual Attention --------------------------------------------------------
