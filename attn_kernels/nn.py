"""Drop-in modules: the constructors, submodules and state_dict keys of timm's, fused kernels inside."""
from typing import Optional, Type, Union

from torch import Tensor, nn

from . import functional as F
from .activations import create_act_layer
from .backends import Dispatch

__all__ = ["FusedChannelAttn", "FusedSE", "make_divisible"]


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.make_divisible: round v to a multiple of divisor, not below round_limit * v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class FusedSE(nn.Module):
    """Squeeze-and-Excitation, a drop-in for timm.layers.SEModule (same arguments and state_dict).

    y = x * gate(fc2(act(bn(fc1(mean_hw(x)))))); with add_maxpool the pooled vector is
    0.5*mean + 0.5*max. Runs the fused kernels of the current backend (attn_kernels.set_backend);
    a norm_layer, or an act/gate without a fused formula, runs through the reference instead.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 8,
        add_maxpool: bool = False,
        bias: bool = True,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        norm_layer: Optional[Type[nn.Module]] = None,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True, argument="act_layer")
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def _norm(self):
        return None if isinstance(self.bn, nn.Identity) else self.bn

    def forward(self, x: Tensor) -> Tensor:
        return F.se(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            add_maxpool=self.add_maxpool, act=self.act, gate=self.gate, norm=self._norm(),
        )

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.act, gate=self.gate, norm=self._norm())

    def extra_repr(self) -> str:
        return f"channels={self.fc1.in_channels}, rd_channels={self.fc1.out_channels}, add_maxpool={self.add_maxpool}"


class FusedChannelAttn(nn.Module):
    """CBAM's channel attention, a drop-in for timm.layers.cbam.ChannelAttn (same arguments and
    state_dict): y = x * gate(mlp(mean_hw(x)) + mlp(max_hw(x))), mlp = fc2(act(fc1(.)))."""

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 1,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        mlp_bias: bool = False,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = create_act_layer(act_layer, inplace=True, argument="act_layer")
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def forward(self, x: Tensor) -> Tensor:
        return F.channel_attn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, act=self.act, gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.act, gate=self.gate)

    def extra_repr(self) -> str:
        return f"channels={self.fc1.in_channels}, rd_channels={self.fc1.out_channels}"
