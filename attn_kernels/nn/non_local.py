"""Non-local drop-ins (scaled_dot_product_attention inside): timm's NonLocalAttn and mmcv's NonLocal2d."""
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from ..backends import Dispatch
from .module import FusedModule, make_divisible


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
