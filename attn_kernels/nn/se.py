"""Squeeze-and-Excitation drop-ins: timm's SEModule, EffectiveSEModule, EfficientNet's SqueezeExcite
and torchvision's SqueezeExcitation."""
from typing import Optional, Type, Union

from torch import Tensor, nn

from .. import functional as F
from ..activations import create_act_layer
from ..backends import Dispatch
from .module import FusedModule, reduced_channels


class FusedSE(FusedModule):
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
        self.add_maxpool = add_maxpool
        rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True, argument="act_layer")
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def _norm(self):
        return None if isinstance(self.bn, nn.Identity) else self.bn

    def reference_forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.bn(self.fc1(s)))))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.se(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            add_maxpool=self.add_maxpool, act=self.act, gate=self.gate, norm=self._norm(),
        )

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.act, gate=self.gate, norm=self._norm())

    def extra_repr(self) -> str:
        return f"channels={self.fc1.in_channels}, rd_channels={self.fc1.out_channels}, add_maxpool={self.add_maxpool}"


class FusedEffectiveSE(FusedModule):
    """Effective Squeeze-Excitation (CenterMask), a drop-in for timm.layers.EffectiveSEModule (same
    arguments and state_dict): y = x * gate(fc(mean_hw(x))), one (C, C) 1x1 conv; with add_maxpool
    the pooled vector is 0.5*mean + 0.5*max. SE's fused op without its first layer."""

    def __init__(
        self,
        channels: int,
        add_maxpool: bool = False,
        gate_layer: Union[str, Type[nn.Module]] = "hard_sigmoid",
        device=None,
        dtype=None,
        **_,
    ):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.add_maxpool = add_maxpool
        self.fc = nn.Conv2d(channels, channels, kernel_size=1, padding=0, device=device, dtype=dtype)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def reference_forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3), keepdim=True)
        return x * self.gate(self.fc(s))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.se(x, None, None, self.fc.weight, self.fc.bias, add_maxpool=self.add_maxpool, gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act="identity", gate=self.gate)

    def extra_repr(self) -> str:
        return f"channels={self.fc.in_channels}, add_maxpool={self.add_maxpool}"


class FusedSqueezeExcite(FusedModule):
    """The SE of timm's EfficientNet and MobileNet family, a drop-in for
    timm.models._efficientnet_blocks.SqueezeExcite (same arguments and state_dict: conv_reduce,
    conv_expand): y = x * gate(conv_expand(act1(conv_reduce(mean_hw(x))))), SE's fused op."""

    def __init__(
        self,
        in_chs: int,
        rd_ratio: float = 0.25,
        rd_channels: Optional[int] = None,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        gate_layer: Union[str, Type[nn.Module]] = nn.Sigmoid,
        force_act_layer: Optional[Union[str, Type[nn.Module]]] = None,
        rd_round_fn=None,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(in_chs, int) or in_chs < 1:
            raise ValueError(f"in_chs must be a positive int, got {in_chs!r}")
        if rd_channels is None:
            rd_channels = (rd_round_fn or round)(in_chs * rd_ratio)
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True, **dd)
        self.act1 = create_act_layer(force_act_layer or act_layer, inplace=True, argument="act_layer")
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True, **dd)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def reference_forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.se(x, self.conv_reduce.weight, self.conv_reduce.bias, self.conv_expand.weight,
                    self.conv_expand.bias, act=self.act1, gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.act1, gate=self.gate)

    def extra_repr(self) -> str:
        return f"in_chs={self.conv_reduce.in_channels}, rd_channels={self.conv_reduce.out_channels}"


class FusedSqueezeExcitation(FusedModule):
    """SE in torchvision's layout, a drop-in for torchvision.ops.SqueezeExcitation(input_channels,
    squeeze_channels, activation, scale_activation) (same state_dict: fc1, fc2):
    y = scale_activation(fc2(activation(fc1(mean_hw(x))))) * x, SE's fused op."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        if not isinstance(input_channels, int) or input_channels < 1:
            raise ValueError(f"input_channels must be a positive int, got {input_channels!r}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def reference_forward(self, x: Tensor) -> Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.se(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                    act=self.activation, gate=self.scale_activation)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.activation, gate=self.scale_activation)

    def extra_repr(self) -> str:
        return f"input_channels={self.fc1.in_channels}, squeeze_channels={self.fc1.out_channels}"
