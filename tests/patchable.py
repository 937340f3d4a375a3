"""Every module attn_kernels.patch fuses, by name (MODULES), as the tests build them: timm's,
torchvision's and segmentation_models_pytorch's classes, and the papers', mmcv's and smp's modules
as users copy them into their own code (same names and structure), written out here."""
import torch
import torch.nn.functional as F
from torch import nn

import timm
import torchvision
from timm.layers import cbam as timm_cbam
from timm.models._efficientnet_blocks import SqueezeExcite

# ---- the papers' modules, as users copy them into their code (same names and structure) ----------

class BasicConv(nn.Module):
    """The CBAM code's conv unit: conv, optional BN (momentum 0.01), optional ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, padding=0, relu=True, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return self.relu(x) if self.relu is not None else x


class ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        self.gate_channels = gate_channels
        hidden = gate_channels // reduction_ratio
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, gate_channels))
        self.pool_types = list(pool_types)

    def forward(self, x):
        pools = {"avg": F.avg_pool2d, "max": F.max_pool2d, "lp": lambda x, k: F.lp_pool2d(x, 2, k)}
        logits = sum(self.mlp(pools[p](x, tuple(x.shape[2:]))) for p in self.pool_types)
        return x * torch.sigmoid(logits)[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self, relu=False):
        super().__init__()
        self.spatial = BasicConv(2, 1, 7, padding=3, relu=relu)

    def forward(self, x):
        pooled = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)


class eca_layer(nn.Module):  # noqa: N801 (the ECA-Net code's name)
    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x).squeeze(-1).transpose(-1, -2)
        y = self.conv(y).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


class ContextBlock(nn.Module):
    """mmcv.cnn.ContextBlock's structure and computation."""

    def __init__(self, in_channels, ratio, pooling_type="att", fusion_types=("channel_add",)):
        super().__init__()
        self.in_channels, self.ratio, self.planes = in_channels, ratio, int(in_channels * ratio)
        self.pooling_type, self.fusion_types = pooling_type, fusion_types
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)
            self.softmax = nn.Softmax(dim=2)
        else:
            self.avg_pool = nn.AdaptiveAvgPool2d(1)

        def transform():
            return nn.Sequential(nn.Conv2d(in_channels, self.planes, 1), nn.LayerNorm([self.planes, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(self.planes, in_channels, 1))

        self.channel_add_conv = transform() if "channel_add" in fusion_types else None
        self.channel_mul_conv = transform() if "channel_mul" in fusion_types else None

    def forward(self, x):
        n, c, h, w = x.shape
        if self.pooling_type == "att":
            weights = self.softmax(self.conv_mask(x).view(n, 1, h * w)).unsqueeze(-1)
            context = torch.matmul(x.view(n, 1, c, h * w), weights).view(n, c, 1, 1)
        else:
            context = self.avg_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


class ConvModule(nn.Module):
    """mmcv.cnn.ConvModule(in, out, 1) without norm and activation, as NonLocal2d builds its g, theta, phi."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.with_activation = False
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.conv(x)


class NonLocal2d(nn.Module):
    """mmcv.cnn.NonLocal2d (mmcv/cnn/bricks/non_local.py), written out for 'embedded_gaussian'
    and the 'dot_product' mode (which has no fused path)."""

    def __init__(self, in_channels, reduction=2, use_scale=True, mode="embedded_gaussian", sub_sample=False):
        super().__init__()
        self.in_channels, self.reduction, self.use_scale = in_channels, reduction, use_scale
        self.inter_channels = in_channels // reduction
        self.mode, self.sub_sample = mode, sub_sample
        self.g = ConvModule(in_channels, self.inter_channels)
        self.conv_out = ConvModule(self.inter_channels, in_channels)
        self.theta = ConvModule(in_channels, self.inter_channels)
        self.phi = ConvModule(in_channels, self.inter_channels)
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(kernel_size=(2, 2)))
            self.phi = nn.Sequential(self.phi, nn.MaxPool2d(kernel_size=(2, 2)))

    def forward(self, x):
        n = x.size(0)
        g_x = self.g(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(n, self.inter_channels, -1)
        pairwise = torch.matmul(theta_x, phi_x)
        if self.mode == "dot_product":
            pairwise = pairwise / pairwise.shape[-1]
        else:
            if self.use_scale:
                pairwise = pairwise / theta_x.shape[-1] ** 0.5
            pairwise = pairwise.softmax(dim=-1)
        y = torch.matmul(pairwise, g_x).permute(0, 2, 1).contiguous().reshape(n, self.inter_channels, *x.size()[2:])
        return x + self.conv_out(y)


class SCSEModule(nn.Module):
    """segmentation_models_pytorch's SCSEModule (segmentation_models_pytorch/base/modules.py), as
    copied into a user's code."""

    def __init__(self, in_channels, reduction=16):
        super().__init__()
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, in_channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels // reduction, in_channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(in_channels, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.cSE(x) + x * self.sSE(x)


# ---- every supported module ------------------------------------------------------------------------

C = 32
MODULES = {
    "timm SEModule": lambda: timm.layers.SEModule(C),
    "timm SEModule add_maxpool silu": lambda: timm.layers.SEModule(C, add_maxpool=True, act_layer=nn.SiLU),
    "timm EffectiveSEModule": lambda: timm.layers.EffectiveSEModule(C),
    "timm EffectiveSEModule add_maxpool": lambda: timm.layers.EffectiveSEModule(C, add_maxpool=True),
    "timm SqueezeExcite (EfficientNet)": lambda: SqueezeExcite(C, act_layer=nn.SiLU),
    "timm SqueezeExcite (MobileNetV3)": lambda: SqueezeExcite(C, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU),
    "timm EcaModule": lambda: timm.layers.EcaModule(C),
    "timm EcaModule use_mlp": lambda: timm.layers.EcaModule(C, use_mlp=True),
    "timm CecaModule": lambda: timm.layers.CecaModule(C),
    "timm ChannelAttn": lambda: timm_cbam.ChannelAttn(C),
    "timm SpatialAttn": lambda: timm_cbam.SpatialAttn(),
    "timm CbamModule": lambda: timm_cbam.CbamModule(C),
    "timm LightChannelAttn": lambda: timm_cbam.LightChannelAttn(C),
    "timm LightSpatialAttn": lambda: timm_cbam.LightSpatialAttn(),
    "timm LightCbamModule": lambda: timm_cbam.LightCbamModule(C),
    "timm GlobalContext": lambda: timm.layers.GlobalContext(C),
    "timm GlobalContext gca": lambda: timm.layers.GlobalContext(C, fuse_add=True, fuse_scale=False),
    "torchvision SqueezeExcitation": lambda: torchvision.ops.SqueezeExcitation(C, 8),
    "torchvision SqueezeExcitation hardsigmoid": lambda: torchvision.ops.SqueezeExcitation(
        C, 8, scale_activation=nn.Hardsigmoid),
    "official CBAM": lambda: CBAM(C, reduction_ratio=4),
    "official CBAM max no_spatial": lambda: CBAM(C, reduction_ratio=4, pool_types=["max"], no_spatial=True),
    "official ChannelGate": lambda: ChannelGate(C, reduction_ratio=4),
    "official SpatialGate": lambda: SpatialGate(),
    "official eca_layer": lambda: eca_layer(C, k_size=5),
    "mmcv ContextBlock": lambda: ContextBlock(C, 1 / 4),
    "mmcv ContextBlock avg mul+add": lambda: ContextBlock(C, 1 / 4, "avg", ["channel_mul", "channel_add"]),
    "timm SelectiveKernel": lambda: timm.layers.SelectiveKernel(C),
    "timm SelectiveKernel 3 paths stride 2": lambda: timm.layers.SelectiveKernel(
        C, kernel_size=[3, 5, 7], split_input=False, stride=2),
    "timm NonLocalAttn": lambda: timm.layers.NonLocalAttn(C),
    "mmcv NonLocal2d": lambda: NonLocal2d(C),
    "mmcv NonLocal2d sub_sample": lambda: NonLocal2d(C, sub_sample=True, use_scale=False),
    "copied SCSEModule": lambda: SCSEModule(C, reduction=4),
}
try:  # the real one, where segmentation_models_pytorch installs (scripts/setup.sh installs it)
    from segmentation_models_pytorch.base.modules import SCSEModule as SmpSCSEModule

    MODULES["smp SCSEModule"] = lambda: SmpSCSEModule(C, reduction=4)
except ImportError:
    pass


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """model with every norm layer's affine parameters and statistics, and every all-zero
    parameter (zero-initialized last layers), drawn at random: timm zero-initializes the layers
    that feed or follow its attention modules, which would hide their errors."""
    g = torch.Generator().manual_seed(seed)

    def draw(t, low=None):
        r = torch.rand(t.shape, generator=g) + low if low is not None else torch.randn(t.shape, generator=g) * 0.1
        t.copy_(r.to(t.dtype))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    draw(m.weight, low=0.5)
                    draw(m.bias)
                if getattr(m, "running_var", None) is not None:
                    draw(m.running_mean)
                    draw(m.running_var, low=0.5)
        for p in model.parameters():
            if not p.any():
                draw(p)
    return model
