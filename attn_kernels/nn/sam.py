"""Sigmoid-gate drop-ins: YOLOv4's SAM (point-wise and spatial) and Residual Attention's (1 + M) * T."""
from typing import Optional

import torch
from torch import Tensor, fx, nn

from .. import functional as F
from ..backends import Dispatch
from .module import FusedModule, traced_call


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
            return traced_call(self, trunk, mask_logits)
        return self.fused_forward(trunk, mask_logits)

    def reference_forward(self, trunk: Tensor, mask_logits: Tensor) -> Tensor:
        return (1 + torch.sigmoid(mask_logits)) * trunk

    def fused_forward(self, trunk: Tensor, mask_logits: Tensor) -> Tensor:
        return F.residual_attention(trunk, mask_logits)

    def dispatch(self, trunk: Tensor, mask_logits: Tensor) -> Dispatch:
        """The backend forward(trunk, mask_logits) runs on, and why each backend before it was passed over."""
        return F.sigmoid_gate_dispatch(trunk, mask_logits)


# --- Non-local ----------------------------------------------------------------------------------
