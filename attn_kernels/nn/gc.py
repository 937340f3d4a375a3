"""Global context drop-ins: timm's GlobalContext and mmcv's ContextBlock."""
from typing import Optional, Type, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import reference
from ..activations import create_act_layer
from ..backends import Dispatch
from .module import FusedModule, reduced_channels


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
        rd_channels = reduced_channels(channels, rd_ratio, rd_channels, rd_divisor)
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
