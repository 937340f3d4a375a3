"""CBAM drop-ins: timm's CbamModule, LightCbamModule and their channel and spatial halves, and the
paper's own CBAM (Jongchan/attention-module)."""
from typing import Optional, Type, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import batch_norm
from ..activations import create_act_layer, kernel_activation_name
from ..backends import Dispatch
from .module import FusedModule, reduced_channels


class FusedChannelAttn(FusedModule):
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
        rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = create_act_layer(act_layer, inplace=True, argument="act_layer")
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def reference_forward(self, x: Tensor) -> Tensor:
        mlp_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mlp_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(mlp_avg + mlp_max)

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.channel_attn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, act=self.act, gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.act, gate=self.gate)

    def extra_repr(self) -> str:
        return f"channels={self.fc1.in_channels}, rd_channels={self.fc1.out_channels}"


class ConvBn(nn.Module):
    """A bias-free k x k conv and a BatchNorm2d: the parameters and state_dict keys of timm's
    ConvNormAct(in, out, k, apply_act=False) (conv.weight, bn.weight, bn.bias, bn.running_*)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bn_momentum: float = 0.1,
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_channels, momentum=bn_momentum, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))




class FusedSpatialAttn(FusedModule):
    """CBAM's spatial attention, a drop-in for timm.layers.cbam.SpatialAttn (same arguments and
    state_dict): y = x * gate(BN(conv_kxk([mean_c x, max_c x])))."""

    def __init__(self, kernel_size: int = 7, gate_layer: Union[str, Type[nn.Module]] = "sigmoid", device=None, dtype=None):
        super().__init__()
        self.conv = ConvBn(2, 1, kernel_size, device=device, dtype=dtype)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def reference_forward(self, x: Tensor) -> Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(maps))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.cbam(x, None, None, None, None, self.conv.conv.weight, **batch_norm.module_arguments(self.conv.bn), gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.cbam_dispatch(x, self.conv.conv.weight, **batch_norm.module_tensors(self.conv.bn), gate=self.gate)


class FusedCBAM(FusedModule):
    """CBAM, a drop-in for timm.layers.cbam.CbamModule (same arguments and state_dict): channel
    attention then spatial attention, computed by one fused op that never writes the channel-gated
    activation to memory. Its parts are a FusedChannelAttn (.channel) and a FusedSpatialAttn (.spatial)."""

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        mlp_bias: bool = False,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.channel = FusedChannelAttn(
            channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor, act_layer=act_layer,
            gate_layer=gate_layer, mlp_bias=mlp_bias, **dd,
        )
        self.spatial = FusedSpatialAttn(spatial_kernel_size, gate_layer=gate_layer, **dd)

    def _fusable(self) -> bool:
        # One op applies one gate formula to both attentions; different gates run the parts apart.
        return kernel_activation_name(self.channel.gate) == kernel_activation_name(self.spatial.gate)

    def reference_forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))

    def fused_forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self.spatial(self.channel(x))
        ch = self.channel
        return F.cbam(
            x, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, self.spatial.conv.conv.weight,
            **batch_norm.module_arguments(self.spatial.conv.bn), act=ch.act, gate=ch.gate,
        )

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        if not self._fusable():
            return F.cbam_dispatch(x, self.spatial.conv.conv.weight, **batch_norm.module_tensors(self.spatial.conv.bn),
                                   gate=self.spatial.gate)
        return F.cbam_dispatch(x, self.spatial.conv.conv.weight, **batch_norm.module_tensors(self.spatial.conv.bn),
                               act=self.channel.act, gate=self.channel.gate)


class FusedLightChannelAttn(FusedChannelAttn):
    """The channel half of timm's LightCbamModule, a drop-in for timm.layers.cbam.LightChannelAttn
    (same arguments and state_dict): y = x * sigmoid(mlp(0.5 * mean_hw(x) + 0.5 * max_hw(x))). As in
    timm, the gate is the sigmoid whatever gate_layer says."""

    def reference_forward(self, x: Tensor) -> Tensor:
        pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(pooled))))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.channel_attn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, pool="mix",
                              act=self.act)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gate_dispatch(x, act=self.act)


def _light_conv_weight(weight: Tensor) -> Tensor:
    """LightSpatialAttn's (1, 1, k, k) conv of 0.5 * mean_c + 0.5 * max_c as the (1, 2, k, k) conv
    of [mean_c, max_c] the fused op takes: the same function, half the weight on each map."""
    half = 0.5 * weight
    return torch.cat([half, half], dim=1)


class FusedLightSpatialAttn(FusedModule):
    """The spatial half of timm's LightCbamModule, a drop-in for timm.layers.cbam.LightSpatialAttn
    (same arguments and state_dict): y = x * gate(BN(conv_kxk(0.5 * mean_c x + 0.5 * max_c x)))."""

    def __init__(self, kernel_size: int = 7, gate_layer: Union[str, Type[nn.Module]] = "sigmoid", device=None, dtype=None):
        super().__init__()
        self.conv = ConvBn(1, 1, kernel_size, device=device, dtype=dtype)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def reference_forward(self, x: Tensor) -> Tensor:
        pooled = 0.5 * x.mean(dim=1, keepdim=True) + 0.5 * x.amax(dim=1, keepdim=True)
        return x * self.gate(self.conv(pooled))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.cbam(x, None, None, None, None, _light_conv_weight(self.conv.conv.weight),
                      **batch_norm.module_arguments(self.conv.bn), gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.cbam_dispatch(x, _light_conv_weight(self.conv.conv.weight), **batch_norm.module_tensors(self.conv.bn),
                               gate=self.gate)


class FusedLightCBAM(FusedModule):
    """timm's 'lightweight' CBAM, a drop-in for timm.layers.cbam.LightCbamModule (same arguments and
    state_dict): FusedLightChannelAttn (.channel) then FusedLightSpatialAttn (.spatial), one fused op
    that pools 0.5 * mean + 0.5 * max on both sides. As in timm, gate_layer reaches neither half:
    the channel gate is the sigmoid, and so is the spatial one by default."""

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        mlp_bias: bool = False,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.channel = FusedLightChannelAttn(
            channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor, act_layer=act_layer,
            gate_layer=gate_layer, mlp_bias=mlp_bias, **dd,
        )
        self.spatial = FusedLightSpatialAttn(spatial_kernel_size, **dd)

    def _fusable(self) -> bool:
        # One op applies one gate formula to both halves, and the channel half's is the sigmoid.
        return kernel_activation_name(self.spatial.gate) == "sigmoid"

    def reference_forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))

    def fused_forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self.spatial(self.channel(x))
        ch, conv = self.channel, self.spatial.conv
        return F.cbam(x, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, _light_conv_weight(conv.conv.weight),
                      **batch_norm.module_arguments(conv.bn), pool="mix", act=ch.act)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        conv = self.spatial.conv
        if not self._fusable():
            return F.cbam_dispatch(x, _light_conv_weight(conv.conv.weight), **batch_norm.module_tensors(conv.bn),
                                   gate=self.spatial.gate)
        return F.cbam_dispatch(x, _light_conv_weight(conv.conv.weight), **batch_norm.module_tensors(conv.bn),
                               act=self.channel.act)


# The official CBAM's parts. Patched modules (attn_kernels.patch) keep their own children, so the
# fused forwards read the children's attributes through these functions, never their methods.
def _official_pool(channel_gate: nn.Module) -> str:
    """The op's pool for the official ChannelGate's pool_types."""
    types = set(channel_gate.pool_types)
    return "avg+max" if types == {"avg", "max"} else types.pop()


def _official_conv_weight(spatial_gate: nn.Module) -> Tensor:
    """The official SpatialGate's conv weight as the op takes it: the official code pools
    [max, mean] over channels, the op [mean, max]."""
    return spatial_gate.spatial.conv.weight.flip(1)


class _OfficialChannelGate(FusedModule):
    def __init__(self, gate_channels: int, reduction_ratio: int, pool_types, **dd):
        super().__init__()
        self.gate_channels = gate_channels
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio, **dd),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels, **dd),
        )
        self.pool_types = list(pool_types)

    def reference_forward(self, x: Tensor) -> Tensor:
        logits = x.new_zeros((x.shape[0], x.shape[1]))
        for pool_type in self.pool_types:
            pooled = x.mean((2, 3), keepdim=True) if pool_type == "avg" else x.amax((2, 3), keepdim=True)
            logits = logits + self.mlp(pooled)
        return x * torch.sigmoid(logits)[:, :, None, None]

    def fused_forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.mlp[1], self.mlp[3]
        return F.channel_attn(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, pool=_official_pool(self))

    def dispatch(self, x: Tensor) -> Dispatch:
        return F.gate_dispatch(x)


class _OfficialSpatialGate(FusedModule):
    def __init__(self, **dd):
        super().__init__()
        self.spatial = ConvBn(2, 1, 7, bn_momentum=0.01, **dd)

    def reference_forward(self, x: Tensor) -> Tensor:
        maps = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.cbam(x, None, None, None, None, _official_conv_weight(self), **batch_norm.module_arguments(self.spatial.bn))

    def dispatch(self, x: Tensor) -> Dispatch:
        return F.cbam_dispatch(x, _official_conv_weight(self), **batch_norm.module_tensors(self.spatial.bn))


class FusedCBAMOfficial(FusedModule):
    """CBAM in the layout of the paper's official code (Jongchan/attention-module, MODELS/cbam.py):
    CBAM(gate_channels, reduction_ratio=16, pool_types=['avg', 'max'], no_spatial=False), whose
    state_dict it loads (ChannelGate.mlp.1/3 linear layers with bias, SpatialGate.spatial.conv/bn).

    It differs from timm's CbamModule in the channel MLP (linear layers with bias, C // ratio
    hidden units), the spatial pooling order ([max, mean]), BatchNorm momentum 0.01, pool_types
    and no_spatial; the same fused op computes it. One difference from that code remains by design:
    tied maxima share the max-pooling gradient equally (as torch.amax), where the official code's
    max_pool2d and torch.max send it to one of them. Without ties the gradients are the same.
    """

    def __init__(self, gate_channels: int, reduction_ratio: int = 16, pool_types=("avg", "max"),
                 no_spatial: bool = False, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(gate_channels, int) or gate_channels < 1:
            raise ValueError(f"gate_channels must be a positive int, got {gate_channels!r}")
        if not pool_types or not set(pool_types) <= {"avg", "max"}:
            raise ValueError(f"pool_types must hold 'avg' and/or 'max' (the fused kernels' pools), got {pool_types!r}")
        self.ChannelGate = _OfficialChannelGate(gate_channels, reduction_ratio, pool_types, **dd)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = _OfficialSpatialGate(**dd)

    def reference_forward(self, x: Tensor) -> Tensor:
        x = self.ChannelGate(x)
        if hasattr(self, "SpatialGate"):  # no_spatial leaves it out
            x = self.SpatialGate(x)
        return x

    def fused_forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.ChannelGate.mlp[1], self.ChannelGate.mlp[3]
        pool = _official_pool(self.ChannelGate)
        if self.no_spatial:
            return F.channel_attn(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, pool=pool)
        return F.cbam(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, _official_conv_weight(self.SpatialGate),
                      **batch_norm.module_arguments(self.SpatialGate.spatial.bn), pool=pool)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        if self.no_spatial:
            return F.gate_dispatch(x)
        return F.cbam_dispatch(x, _official_conv_weight(self.SpatialGate), **batch_norm.module_tensors(self.SpatialGate.spatial.bn))
