"""Drop-in modules: the constructors, submodules and state_dict keys of timm's (mmcv's, the papers'), fused
kernels inside."""
import math
import warnings
from typing import Optional, Type, Union

import torch
from torch import Tensor, fx, nn

from . import functional as F
from . import batch_norm, reference
from .activations import create_act_layer, kernel_activation_name
from .backends import Dispatch
from .ops.primitives import acc_dtype

__all__ = [
    "FusedCBAM", "FusedCBAMOfficial", "FusedCECA", "FusedChannelAttn", "FusedContextBlock", "FusedECA",
    "FusedECAOfficial", "FusedEffectiveSE", "FusedGC", "FusedLightCBAM", "FusedLightChannelAttn",
    "FusedLightSpatialAttn", "FusedNonLocal2d", "FusedNonLocalAttn", "FusedResidualAttention", "FusedSAM", "FusedSE",
    "FusedSelectiveKernel", "FusedSelectiveKernelAttn", "FusedSpatialAttn", "FusedSqueezeExcitation",
    "FusedSqueezeExcite", "FusedModule", "MMCVConvModule", "make_divisible",
]


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


def _traced_call(module: nn.Module, *inputs: fx.Proxy) -> fx.Proxy:
    """`module` applied to `inputs` under torch.fx symbolic tracing: one call_module node, so that
    the traced module runs the fused forward and makes its run-time choices (backend, dtype,
    sizes: none of which a symbolic trace can see) when it runs, as eager does. This holds under
    any tracer (torch.fx's own, torchvision's feature extraction, timm's), with no registry of
    leaf modules to keep. A fused module traced by itself (the root) has no parent to call it:
    its original computation is traced instead, with a warning."""
    tracer = inputs[0].tracer
    path = tracer.path_of_module(module)
    if path:
        return tracer.create_proxy("call_module", path, inputs, {})
    warnings.warn(f"torch.fx traces {type(module).__name__} by itself: the graph holds its original computation, "
                  "not the fused kernels (trace a model that contains it to keep it fused)", stacklevel=3)
    return module.reference_forward(*inputs)


class FusedModule(nn.Module):
    """Base of the fused drop-ins and of the modules attn_kernels.patch fuses.

    forward(x) runs `fused_forward`, the fused kernels, in eager mode and under torch.compile and
    torch.export (whose graphs hold the fused ops). Under torch.fx symbolic tracing the module is
    one call in the graph (see _traced_call). TorchScript compiles `reference_forward` instead,
    the module's original computation in plain PyTorch ops (for a patched module, its own class's
    forward): the fused ops choose their kernels in Python at run time, and Triton kernels run
    only from Python, which a scripted model, made to run without Python, cannot call.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone
            return self.reference_forward(x)
        if isinstance(x, fx.Proxy):
            return _traced_call(self, x)
        return self.fused_forward(x)

    def fused_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reference_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __prepare_scriptable__(self):
        warnings.warn(f"torch.jit.script compiles {type(self).__name__}'s original computation, not its fused "
                      "kernels (attn_kernels.nn.FusedModule says why)", stacklevel=2)
        return self


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
        rd_channels = _reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
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
        rd_channels = _reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
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


def _batch_norm_tensors(bn: nn.BatchNorm2d) -> dict:
    """The statistics and affine parameters F.batch_norm gets from nn.BatchNorm2d.forward, and the
    process group an nn.SyncBatchNorm synchronizes them over (attn_kernels.batch_norm)."""
    track = not bn.training or bn.track_running_stats
    return {
        "bn_running_mean": bn.running_mean if track else None,
        "bn_running_var": bn.running_var if track else None,
        "bn_weight": bn.weight,
        "bn_bias": bn.bias,
        "bn_training": bn.training or (bn.running_mean is None and bn.running_var is None),
        "bn_group": batch_norm.group_name(bn),
    }


def _batch_norm_arguments(bn: nn.BatchNorm2d) -> dict:
    """All of F.batch_norm's arguments for this batch, counting it as nn.BatchNorm2d.forward does."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return {**_batch_norm_tensors(bn), "bn_momentum": momentum, "bn_eps": bn.eps}


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
        return F.cbam(x, None, None, None, None, self.conv.conv.weight, **_batch_norm_arguments(self.conv.bn), gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.cbam_dispatch(x, self.conv.conv.weight, **_batch_norm_tensors(self.conv.bn), gate=self.gate)


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
            **_batch_norm_arguments(self.spatial.conv.bn), act=ch.act, gate=ch.gate,
        )

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        if not self._fusable():
            return F.cbam_dispatch(x, self.spatial.conv.conv.weight, **_batch_norm_tensors(self.spatial.conv.bn),
                                   gate=self.spatial.gate)
        return F.cbam_dispatch(x, self.spatial.conv.conv.weight, **_batch_norm_tensors(self.spatial.conv.bn),
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
                      **_batch_norm_arguments(self.conv.bn), gate=self.gate)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.cbam_dispatch(x, _light_conv_weight(self.conv.conv.weight), **_batch_norm_tensors(self.conv.bn),
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
                      **_batch_norm_arguments(conv.bn), pool="mix", act=ch.act)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        conv = self.spatial.conv
        if not self._fusable():
            return F.cbam_dispatch(x, _light_conv_weight(conv.conv.weight), **_batch_norm_tensors(conv.bn),
                                   gate=self.spatial.gate)
        return F.cbam_dispatch(x, _light_conv_weight(conv.conv.weight), **_batch_norm_tensors(conv.bn),
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
        return F.cbam(x, None, None, None, None, _official_conv_weight(self), **_batch_norm_arguments(self.spatial.bn))

    def dispatch(self, x: Tensor) -> Dispatch:
        return F.cbam_dispatch(x, _official_conv_weight(self), **_batch_norm_tensors(self.spatial.bn))


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
                      **_batch_norm_arguments(self.SpatialGate.spatial.bn), pool=pool)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        if self.no_spatial:
            return F.gate_dispatch(x)
        return F.cbam_dispatch(x, _official_conv_weight(self.SpatialGate), **_batch_norm_tensors(self.SpatialGate.spatial.bn))


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d: LayerNorm over the channels of an NCHW tensor (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """timm.layers.ConvMlp as GlobalContext builds it: fc1 (1x1 conv), LayerNorm2d, act, dropout
    (p = 0), fc2; its submodule names are the state_dict keys."""

    def __init__(self, in_features: int, hidden_features: int, act_layer, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1, bias=True, **dd)
        self.norm = LayerNorm2d(hidden_features, **dd)
        self.act = create_act_layer(act_layer, argument="act_layer")
        self.drop = nn.Dropout(0.0)
        self.fc2 = nn.Conv2d(hidden_features, in_features, kernel_size=1, bias=True, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


def _conv_mlp_weights(mlp: Optional[nn.Module]):
    """A ConvMlp's (ours or timm's) tensors as attn_kernels.functional.gc takes them; None without it."""
    if mlp is None:
        return None
    return [mlp.fc1.weight, mlp.fc1.bias, mlp.norm.weight, mlp.norm.bias, mlp.fc2.weight, mlp.fc2.bias]


class FusedGC(FusedModule):
    """Global context attention (GCNet), a drop-in for timm.layers.GlobalContext (same arguments
    and state_dict): context = attention pooling of x (softmax over H*W of conv_attn(x)), or its
    mean without use_attn; y = x * gate(mlp_scale(context)) (fuse_scale) + mlp_add(context) (fuse_add).

    The attention pooling reads x once (an online softmax); forward moves 3|x|, backward at most 5|x|.
    """

    def __init__(
        self,
        channels: int,
        use_attn: bool = True,
        fuse_add: bool = False,
        fuse_scale: bool = True,
        init_last_zero: bool = False,
        rd_ratio: float = 1.0 / 8,
        rd_channels: Optional[int] = None,
        rd_divisor: int = 1,
        act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
        gate_layer: Union[str, Type[nn.Module]] = "sigmoid",
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.conv_attn = nn.Conv2d(channels, 1, kernel_size=1, bias=True, **dd) if use_attn else None
        rd_channels = _reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.mlp_add = ConvMlp(channels, rd_channels, act_layer, **dd) if fuse_add else None
        self.mlp_scale = ConvMlp(channels, rd_channels, act_layer, **dd) if fuse_scale else None
        self.gate = create_act_layer(gate_layer, argument="gate_layer")
        self.init_last_zero = init_last_zero
        self.reset_parameters()

    def reset_parameters(self):
        """timm's initialization (init_last_zero is stored but, as in timm, not consulted)."""
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        if self.mlp_add is not None:
            nn.init.zeros_(self.mlp_add.fc2.weight)

    def _arguments(self) -> dict:
        """conv_attn and the transforms as attn_kernels.functional.gc takes them."""
        mlps = [m for m in (self.mlp_scale, self.mlp_add) if m is not None]
        if len(mlps) == 2 and type(mlps[0].act) is not type(mlps[1].act):
            raise ValueError(
                f"mlp_scale.act ({type(mlps[0].act).__name__}) and mlp_add.act ({type(mlps[1].act).__name__}) "
                "differ; FusedGC applies one activation to both transforms, as timm builds them"
            )
        return {
            "attn_weight": self.conv_attn.weight if self.conv_attn is not None else None,
            "attn_bias": self.conv_attn.bias if self.conv_attn is not None else None,
            "scale_weights": _conv_mlp_weights(self.mlp_scale),
            "add_weights": _conv_mlp_weights(self.mlp_add),
            "act": mlps[0].act if mlps else "relu",
            "gate": self.gate,
        }

    def reference_forward(self, x: Tensor) -> Tensor:
        if self.conv_attn is not None:
            context = reference.attention_context(x, self.conv_attn(x))
        else:
            context = x.mean(dim=(2, 3), keepdim=True)
        if self.mlp_scale is not None:
            x = x * self.gate(self.mlp_scale(context))
        if self.mlp_add is not None:
            x = x + self.mlp_add(context)
        return x

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.gc(
            x, **self._arguments(),
            scale_eps=self.mlp_scale.norm.eps if self.mlp_scale is not None else 1e-6,
            add_eps=self.mlp_add.norm.eps if self.mlp_add is not None else 1e-6,
        )

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gc_dispatch(x, **self._arguments())

    def extra_repr(self) -> str:
        mlp = self.mlp_scale or self.mlp_add
        rd = f", rd_channels={mlp.fc1.out_channels}" if mlp is not None else ""
        return (f"use_attn={self.conv_attn is not None}, fuse_add={self.mlp_add is not None}, "
                f"fuse_scale={self.mlp_scale is not None}{rd}")


def _context_transform(in_channels: int, planes: int, **dd) -> nn.Sequential:
    """mmcv's channel_add_conv / channel_mul_conv: conv, LayerNorm([planes, 1, 1]), ReLU, conv."""
    return nn.Sequential(
        nn.Conv2d(in_channels, planes, kernel_size=1, **dd),
        nn.LayerNorm([planes, 1, 1], **dd),
        nn.ReLU(inplace=True),
        nn.Conv2d(planes, in_channels, kernel_size=1, **dd),
    )


def _transform_weights(seq: Optional[nn.Sequential]):
    if seq is None:
        return None
    return [seq[0].weight, seq[0].bias, seq[1].weight, seq[1].bias, seq[3].weight, seq[3].bias]


class FusedContextBlock(FusedModule):
    """GCNet's context block in mmcv's layout, a drop-in for mmcv.cnn.ContextBlock(in_channels,
    ratio, pooling_type='att', fusion_types=('channel_add',)) whose state_dict it loads
    (conv_mask, channel_add_conv.0/1/3, channel_mul_conv.0/1/3; LayerNorm over [planes, 1, 1],
    eps 1e-5): y = x * sigmoid(channel_mul(context)) + channel_add(context), on FusedGC's op."""

    def __init__(self, in_channels: int, ratio: float, pooling_type: str = "att",
                 fusion_types=("channel_add",), device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if pooling_type not in ("avg", "att"):
            raise ValueError(f"pooling_type must be 'avg' or 'att', got {pooling_type!r}")
        if not isinstance(fusion_types, (list, tuple)) or not fusion_types \
                or not set(fusion_types) <= {"channel_add", "channel_mul"}:
            raise ValueError(f"fusion_types must be a non-empty list of 'channel_add' and/or 'channel_mul', "
                             f"got {fusion_types!r}")
        self.in_channels = in_channels
        self.ratio = ratio
        self.planes = int(in_channels * ratio)
        if self.planes < 1:
            raise ValueError(f"in_channels * ratio must be at least 1, got {in_channels} * {ratio}")
        self.pooling_type = pooling_type
        self.fusion_types = fusion_types
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1, **dd)
        self.channel_add_conv = _context_transform(in_channels, self.planes, **dd) if "channel_add" in fusion_types else None
        self.channel_mul_conv = _context_transform(in_channels, self.planes, **dd) if "channel_mul" in fusion_types else None
        self.reset_parameters()

    def reset_parameters(self):
        """mmcv's initialization: Kaiming-normal conv_mask (fan_in, zero bias), zero last convs."""
        if self.pooling_type == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for seq in (self.channel_add_conv, self.channel_mul_conv):
            if seq is not None:
                nn.init.zeros_(seq[3].weight)
                nn.init.zeros_(seq[3].bias)

    def _arguments(self) -> dict:
        att = self.pooling_type == "att"
        return {
            "attn_weight": self.conv_mask.weight if att else None,
            "attn_bias": self.conv_mask.bias if att else None,
            "scale_weights": _transform_weights(self.channel_mul_conv),
            "add_weights": _transform_weights(self.channel_add_conv),
        }

    def reference_forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "conv_mask"):  # pooling_type 'att'
            context = reference.attention_context(x, self.conv_mask(x))
        else:
            context = x.mean((2, 3), keepdim=True)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out

    def fused_forward(self, x: Tensor) -> Tensor:
        eps = {f"{name}_eps": seq[1].eps for name, seq in (("scale", self.channel_mul_conv), ("add", self.channel_add_conv))
               if seq is not None}
        return F.gc(x, **self._arguments(), **eps)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.gc_dispatch(x, **self._arguments())

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, planes={self.planes}, pooling_type={self.pooling_type!r}, " \
               f"fusion_types={tuple(self.fusion_types)}"


# --- Selective Kernel -------------------------------------------------------------------------

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
            a = _batch_norm_arguments(self.bn)
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
                                  **_batch_norm_arguments(attn.bn), act=attn.act)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend the attention of forward(x) runs on, and why each backend before it was
        passed over (judged on stand-ins for the branch outputs: x's batch, dtype and device)."""
        stand_ins = [x.new_empty((x.shape[0], self.out_channels, 1, 1)) for _ in range(self.num_paths)]
        attn = self.attn
        return F.selective_kernel_dispatch(stand_ins, attn.fc_reduce.weight, attn.fc_select.weight,
                                           **_batch_norm_tensors(attn.bn), act=attn.act)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, num_paths={self.num_paths}"


# --- YOLOv4 SAM and Residual Attention --------------------------------------------------------

class FusedSAM(FusedModule):
    """YOLOv4's spatial attention module: y = x * sigmoid(conv(x)), the conv through cuDNN, the
    sigmoid and the product fused (attn_kernels/ops/sigmoid_gate.py).

    Point-wise (the default, as darknet's configurations: a C-channel 1x1 conv, the "modified SAM"
    of the YOLOv4 paper) or spatial (spatial=True: a 1-channel conv, one gate per pixel).
    kernel_size defaults to 1 (point-wise) and 7 (spatial); state_dict: conv.weight, conv.bias."""

    def __init__(self, channels: int, spatial: bool = False, kernel_size: Optional[int] = None, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        k = kernel_size if kernel_size is not None else (7 if spatial else 1)
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {k!r}")
        self.spatial = spatial
        self.conv = nn.Conv2d(channels, 1 if spatial else channels, k, padding=k // 2, bias=bias,
                              device=device, dtype=dtype)

    def reference_forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.conv(x))

    def fused_forward(self, x: Tensor) -> Tensor:
        return F.sam(x, self.conv(x))

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend the gate of forward(x) runs on, and why each backend before it was passed over."""
        return F.sigmoid_gate_dispatch(x, x[:, :1] if self.spatial else x)  # stand-ins for conv(x)

    def extra_repr(self) -> str:
        return f"channels={self.conv.in_channels}, spatial={self.spatial}, kernel_size={self.conv.kernel_size[0]}"


class FusedResidualAttention(FusedModule):
    """Residual Attention Network's combination of its trunk and mask branches, (1 + M) * T with
    M = sigmoid(mask_logits): give it the mask branch's output before its final nn.Sigmoid, and
    the sigmoid, the 1 + and the product run as one fused op. No parameters."""

    def forward(self, trunk: Tensor, mask_logits: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(trunk, mask_logits)
        if isinstance(trunk, fx.Proxy) or isinstance(mask_logits, fx.Proxy):
            return _traced_call(self, trunk, mask_logits)
        return self.fused_forward(trunk, mask_logits)

    def reference_forward(self, trunk: Tensor, mask_logits: Tensor) -> Tensor:
        return (1 + torch.sigmoid(mask_logits)) * trunk

    def fused_forward(self, trunk: Tensor, mask_logits: Tensor) -> Tensor:
        return F.residual_attention(trunk, mask_logits)

    def dispatch(self, trunk: Tensor, mask_logits: Tensor) -> Dispatch:
        """The backend forward(trunk, mask_logits) runs on, and why each backend before it was passed over."""
        return F.sigmoid_gate_dispatch(trunk, mask_logits)


# --- Non-local ----------------------------------------------------------------------------------

class FusedNonLocalAttn(FusedModule):
    """The non-local block, a drop-in for timm.layers.NonLocalAttn (same arguments and state_dict):
    y = x + norm(z(softmax(scale * t(x)^T p(x)) g(x))), scale = in_channels^-0.5 with use_scale.
    The attention runs through scaled_dot_product_attention (functional.non_local), so the
    (H*W) x (H*W) matrix is never stored on a GPU."""

    def __init__(self, in_channels: int, use_scale: bool = True, rd_ratio: float = 1 / 8,
                 rd_channels: Optional[int] = None, rd_divisor: int = 8, device=None, dtype=None, **_):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if rd_channels is None:
            rd_channels = make_divisible(in_channels * rd_ratio, divisor=rd_divisor)
        self.scale = in_channels ** -0.5 if use_scale else 1.0
        self.t = nn.Conv2d(in_channels, rd_channels, kernel_size=1, bias=True, **dd)
        self.p = nn.Conv2d(in_channels, rd_channels, kernel_size=1, bias=True, **dd)
        self.g = nn.Conv2d(in_channels, rd_channels, kernel_size=1, bias=True, **dd)
        self.z = nn.Conv2d(rd_channels, in_channels, kernel_size=1, bias=True, **dd)
        self.norm = nn.BatchNorm2d(in_channels, **dd)
        self.reset_parameters()

    def reset_parameters(self):
        """timm's initialization: Kaiming-normal convs (fan_out), zero biases, a zero BN (the block
        starts as the identity)."""
        for conv in (self.t, self.p, self.g, self.z):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0.0)
        nn.init.constant_(self.norm.weight, 0)
        nn.init.constant_(self.norm.bias, 0)

    def reference_forward(self, x: Tensor) -> Tensor:
        t, p, g = self.t(x), self.p(x), self.g(x)
        B, C, H, W = t.shape
        att = torch.bmm(t.view(B, C, -1).permute(0, 2, 1), p.view(B, C, -1)) * self.scale
        y = torch.bmm(torch.softmax(att, dim=2), g.view(B, C, -1).permute(0, 2, 1))
        return self.norm(self.z(y.permute(0, 2, 1).reshape(B, C, H, W))) + x

    def fused_forward(self, x: Tensor) -> Tensor:
        y = F.non_local(x, self.t.weight, self.t.bias, self.p.weight, self.p.bias, self.g.weight, self.g.bias,
                        scale=self.scale)
        return self.norm(self.z(y)) + x

    def dispatch(self, x: Tensor) -> Dispatch:
        """How forward(x) computes the attention: 'sdpa', or 'reference' (materialized) when selected."""
        return F.non_local_dispatch(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.t.in_channels}, rd_channels={self.t.out_channels}, scale={self.scale:.4g}"


_MMCV_NORMS = {"BN": ("bn", lambda c, cfg: nn.BatchNorm2d(c, eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1))),
               "BN2d": ("bn", lambda c, cfg: nn.BatchNorm2d(c, eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1))),
               "GN": ("gn", lambda c, cfg: nn.GroupNorm(cfg["num_groups"], c, eps=cfg.get("eps", 1e-5)))}


class MMCVConvModule(nn.Module):
    """The parameters and state_dict keys of mmcv.cnn.ConvModule(in, out, 1) without activation:
    conv (bias unless normalized), then an optional norm named as mmcv names it ('bn', 'gn')."""

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: Optional[dict] = None):
        super().__init__()
        self.norm_cfg = norm_cfg
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=norm_cfg is None)
        self.norm_name = None
        if norm_cfg is not None:
            kind = norm_cfg.get("type") if isinstance(norm_cfg, dict) else None
            if kind not in _MMCV_NORMS:
                raise ValueError(f"norm_cfg type must be one of {sorted(_MMCV_NORMS)}, got {norm_cfg!r}")
            self.norm_name, make = _MMCV_NORMS[kind]
            self.add_module(self.norm_name, make(out_channels, norm_cfg))

    __jit_unused_properties__ = ["norm"]  # TorchScript cannot getattr by a name held in an attribute

    @property
    def norm(self) -> Optional[nn.Module]:
        return getattr(self, self.norm_name) if self.norm_name else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if hasattr(self, "bn"):  # hasattr: a check TorchScript resolves when it compiles
            x = self.bn(x)
        elif hasattr(self, "gn"):
            x = self.gn(x)
        return x


class FusedNonLocal2d(FusedModule):
    """mmcv's NonLocal2d in 'embedded_gaussian' mode, a drop-in (same arguments and state_dict:
    g.conv, conv_out.conv (and conv_out.bn / .gn with norm_cfg), theta.conv, phi.conv; g.0.conv and
    phi.0.conv with sub_sample): y = x + conv_out(softmax(theta(x)^T phi(x) / sqrt(R)) g(x)).
    The attention runs through scaled_dot_product_attention (functional.non_local). Other modes
    ('gaussian', 'dot_product', 'concatenation') have no fused path: use mmcv's module for them."""

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True, conv_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = None, mode: str = "embedded_gaussian", sub_sample: bool = False,
                 std: float = 0.01, zeros_init: bool = True):
        super().__init__()
        if mode != "embedded_gaussian":
            raise ValueError(f"mode must be 'embedded_gaussian' (the only mode with a fused path), got {mode!r}")
        if conv_cfg not in (None, {"type": "Conv2d"}):
            raise ValueError(f"conv_cfg must be None or dict(type='Conv2d'), got {conv_cfg!r}")
        self.in_channels = in_channels
        self.reduction = reduction
        self.use_scale = use_scale
        self.inter_channels = in_channels // reduction
        self.mode = mode
        self.sub_sample = sub_sample
        self.g = MMCVConvModule(in_channels, self.inter_channels)
        self.conv_out = MMCVConvModule(self.inter_channels, in_channels, norm_cfg)
        self.theta = MMCVConvModule(in_channels, self.inter_channels)
        self.phi = MMCVConvModule(in_channels, self.inter_channels)
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(kernel_size=(2, 2)))
            self.phi = nn.Sequential(self.phi, nn.MaxPool2d(kernel_size=(2, 2)))
        self.init_weights(std, zeros_init)

    def init_weights(self, std: float = 0.01, zeros_init: bool = True):
        """mmcv's initialization: normal(std) theta, phi, g convs with zero biases; conv_out (its
        norm, with norm_cfg) zero with zeros_init (the block starts as the identity), else normal."""
        for conv in self._convs():
            nn.init.normal_(conv.weight, 0, std)
            nn.init.zeros_(conv.bias)
        last = self.conv_out.norm if self.conv_out.norm_name else self.conv_out.conv
        if zeros_init:
            nn.init.zeros_(last.weight)
        else:
            nn.init.normal_(last.weight, 0, std)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def _convs(self):
        """The theta, phi and g convs."""
        def conv(m):
            return m[0].conv if isinstance(m, nn.Sequential) else m.conv
        return conv(self.theta), conv(self.phi), conv(self.g)

    def reference_forward(self, x: Tensor) -> Tensor:
        n, r = x.shape[0], self.inter_channels
        g = self.g(x).view(n, r, -1).permute(0, 2, 1)
        theta = self.theta(x).view(n, r, -1).permute(0, 2, 1)
        pairwise = torch.matmul(theta, self.phi(x).view(n, r, -1))
        if self.use_scale:
            pairwise = pairwise / theta.shape[-1] ** 0.5
        y = torch.matmul(pairwise.softmax(dim=-1), g).permute(0, 2, 1).reshape(n, r, x.shape[2], x.shape[3])
        return x + self.conv_out(y)

    def fused_forward(self, x: Tensor) -> Tensor:
        theta, phi, g = self._convs()
        scale = self.inter_channels ** -0.5 if self.use_scale else 1.0
        y = F.non_local(x, theta.weight, theta.bias, phi.weight, phi.bias, g.weight, g.bias, scale=scale,
                        sub_sample=self.sub_sample)
        return x + self.conv_out(y)

    def dispatch(self, x: Tensor) -> Dispatch:
        """How forward(x) computes the attention: 'sdpa', or 'reference' (materialized) when selected."""
        return F.non_local_dispatch(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, sub_sample={self.sub_sample}"
