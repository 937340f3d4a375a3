"""Drop-in modules: the constructors, submodules and state_dict keys of timm's, fused kernels inside."""
from typing import Optional, Type, Union

from torch import Tensor, nn

from . import functional as F
from .activations import create_act_layer, kernel_activation_name
from .backends import Dispatch

__all__ = ["FusedCBAM", "FusedCBAMOfficial", "FusedChannelAttn", "FusedSE", "FusedSpatialAttn", "make_divisible"]


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.make_divisible: round v to a multiple of divisor, not below round_limit * v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _reduced_channels(channels, rd_ratio, rd_channels, rd_divisor) -> int:
    """The bottleneck width of a channel MLP, as timm computes it."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


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
        self.add_maxpool = add_maxpool
        rd_channels = _reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
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
        rd_channels = _reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
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


def _batch_norm_tensors(bn: nn.BatchNorm2d) -> dict:
    """The statistics and affine parameters F.batch_norm gets from nn.BatchNorm2d.forward."""
    track = not bn.training or bn.track_running_stats
    return {
        "bn_running_mean": bn.running_mean if track else None,
        "bn_running_var": bn.running_var if track else None,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "bn_training": bn.training or (bn.running_mean is None and bn.running_var is None),
    }


def _batch_norm_arguments(bn: nn.BatchNorm2d) -> dict:
    """All of F.batch_norm's arguments for this batch, counting it as nn.BatchNorm2d.forward does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return {**_batch_norm_tensors(bn), "bn_momentum": momentum, "bn_eps": bn.eps}


class FusedSpatialAttn(nn.Module):
    """CBAM's spatial attention, a drop-in for timm.layers.cbam.SpatialAttn (same arguments and
    state_dict): y = x * gate(BN(conv_kxk([mean_c x, max_c x])))."""

    def __init__(self, kernel_size: int = 7, gate_layer: Union[str, Type[nn.Module]] = "sigmoid", device=None, dtype=None):
        super().__init__()
        self.conv = ConvBn(2, 1, kernel_size, device=device, dtype=dtype)
        self.gate = create_act_layer(gate_layer, argument="gate_layer")

    def forward(self, x: Tensor) -> Tensor:
        return F.cbam(x, None, None, None, None, self.conv.conv.weight, **_batch_norm_arguments(self.conv.bn), gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.cbam_dispatch(x, self.conv.conv.weight, **_batch_norm_tensors(self.conv.bn), gate=self.gate)


class FusedCBAM(nn.Module):
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

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self.spatial(self.channel(x))
        ch = self.channel
        return F.cbam(
            x, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, self.spatial.conv.conv.weight,
            **_batch_norm_arguments(self.spatial.conv.bn), act=ch.act, gate=ch.gate,
        )

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        if not self._fusable():
            return F.cbam_dispatch(x, self.spatial.conv.conv.weight, **_batch_norm_tensors(self.spatial.conv.bn),
                                   gate=self.spatial.gate)
        return F.cbam_dispatch(x, self.spatial.conv.conv.weight, **_batch_norm_tensors(self.spatial.conv.bn),
                               act=self.channel.act, gate=self.channel.gate)


class _OfficialChannelGate(nn.Module):
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


class _OfficialSpatialGate(nn.Module):
    def __init__(self, **dd):
        super().__init__()
        self.spatial = ConvBn(2, 1, 7, bn_momentum=0.01, **dd)


class FusedCBAMOfficial(nn.Module):
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

    def _pool(self) -> str:
        types = set(self.ChannelGate.pool_types)
        return "avg+max" if types == {"avg", "max"} else types.pop()

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self.ChannelGate.mlp[1], self.ChannelGate.mlp[3]
        if self.no_spatial:
            return F.channel_attn(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, pool=self._pool())
        spatial = self.SpatialGate.spatial
        # The official code pools [max, mean] over channels; the op takes [mean, max].
        conv_weight = spatial.conv.weight.flip(1)
        return F.cbam(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, conv_weight,
                      **_batch_norm_arguments(spatial.bn), pool=self._pool())

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        if self.no_spatial:
            return F.gate_dispatch(x)
        spatial = self.SpatialGate.spatial
        return F.cbam_dispatch(x, spatial.conv.weight, **_batch_norm_tensors(spatial.bn))
