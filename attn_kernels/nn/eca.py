"""Efficient Channel Attention drop-ins: timm's EcaModule and CecaModule, and the paper's eca_layer."""
import math
from typing import Optional, Type, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..activations import create_act_layer
from ..backends import Dispatch
from .module import FusedModule, make_divisible


def _eca_kernel_size(channels, kernel_size, gamma, beta) -> int:
    """timm's ECA kernel size: from the channel count when it is given (odd, at least 3)."""
    if channels is not None:
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int or None, got {channels!r}")
        t = int(abs(math.log(channels, 2) + beta) / gamma)
        kernel_size = max(t if t % 2 else t + 1, 3)
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    return kernel_size


class FusedECA(FusedModule):
    """Efficient Channel Attention, a drop-in for timm.layers.EcaModule (same arguments and
    state_dict): y = x * gate(conv1d_k(mean_hw(x))) with the conv across channels, zero padded.

    The kernel size comes from `channels` by timm's rule when channels is given. use_mlp is
    timm's experiment: conv (1 -> rd_channels maps, 1x1), act, conv2 (rd_channels -> 1, k taps).
    The fused path is the SE one (ops/channel_gate.py): 3|x| forward, 4|x| backward.
    """

    def __init__(
        self,
        channels: Optional[int] = None,
        kernel_size: int = 3,
        gamma: float = 2,
        beta: float = 1,
        act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        rd_ratio: float = 1 / 8,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 8,
        use_mlp: bool = False,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        kernel_size = _eca_kernel_size(channels, kernel_size, gamma, beta)
        padding = (kernel_size - 1) // 2
        if use_mlp:
            if channels is None:
                raise ValueError("use_mlp=True needs channels (the hidden width derives from it)")
            rd_channels = rd_channels or make_divisible(channels * rd_ratio, divisor=rd_divisor)
            self.conv = nn.Conv1d(1, rd_channels, kernel_size=1, padding=0, bias=True, **dd)
            self.act = create_act_layer(act_layer or nn.ReLU, argument="act_layer")
            self.conv2 = nn.Conv1d(rd_channels, 1, kernel_size=kernel_size, padding=padding, bias=True, **dd)
        else:
            self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=padding, bias=False, **dd)
            self.act = None
            self.conv2 = None
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def _conv2(self):
        return (self.conv2.weight, self.conv2.bias) if self.conv2 is not None else (None, None)

    def reference_forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        if self.conv2 is not None:
            y = self.conv2(self.act(y))
        return x * self.gate(y).view(x.shape[0], -1, 1, 1)

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.eca(x, self.conv.weight, self.conv.bias, *self._conv2(), act=self.act, gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.eca_dispatch(x, conv2_weight=self._conv2()[0], act=self.act, gate=self.gate)

    def extra_repr(self) -> str:
        taps = self.conv2 if self.conv2 is not None else self.conv
        mlp = f", use_mlp=True, rd_channels={self.conv.out_channels}" if self.conv2 is not None else ""
        return f"kernel_size={taps.kernel_size[0]}{mlp}"


class FusedCECA(FusedModule):
    """Circular ECA, a drop-in for timm.layers.CecaModule (same arguments and state_dict): ECA whose
    conv across channels wraps around (circular padding). As in timm, act_layer only gives the
    conv a bias; no activation is applied."""

    def __init__(
        self,
        channels: Optional[int] = None,
        kernel_size: int = 3,
        gamma: float = 2,
        beta: float = 1,
        act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        device=None,
        dtype=None,
    ):
        super().__init__()
        kernel_size = _eca_kernel_size(channels, kernel_size, gamma, beta)
        self.padding = (kernel_size - 1) // 2
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=0, bias=act_layer is not None,
                              device=device, dtype=dtype)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def reference_forward(self, x: Tensor) -> Tensor:
        y = nn.functional.pad(x.mean((2, 3)).view(x.shape[0], 1, -1), (self.padding, self.padding), mode="circular")
        return x * self.gate(self.conv(y)).view(x.shape[0], -1, 1, 1)

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.eca(x, self.conv.weight, self.conv.bias, circular=True, gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.eca_dispatch(x, gate=self.gate)

    def extra_repr(self) -> str:
        return f"kernel_size={self.conv.kernel_size[0]}, circular=True"


class FusedECAOfficial(FusedModule):
    """ECA in the layout of the paper's official code (BangguWu/ECANet, models/eca_module.py):
    eca_layer(channel, k_size=3), whose state_dict it loads (conv.weight, a bias-free Conv1d(1, 1,
    k_size)); the kernel size is k_size as given, not derived from channel."""

    def __init__(self, channel: int, k_size: int = 3, device=None, dtype=None):
        super().__init__()
        if not isinstance(channel, int) or channel < 1:
            raise ValueError(f"channel must be a positive int, got {channel!r}")
        k_size = _eca_kernel_size(None, k_size, 2, 1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False,
                              device=device, dtype=dtype)

    def reference_forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * torch.sigmoid(y).view(x.shape[0], -1, 1, 1)

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.eca(x, self.conv.weight, None)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.eca_dispatch(x)

    def extra_repr(self) -> str:
        return f"k_size={self.conv.kernel_size[0]}"
