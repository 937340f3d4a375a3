"""scSE drop-in: segmentation_models_pytorch's SCSEModule (the decoder attention of its U-Net,
Unet++, MAnet, ... with decoder_attention_type="scse")."""
from torch import Tensor, nn

from .. import functional as F
from ..backends import Dispatch
from .module import FusedModule


class FusedSCSE(FusedModule):
    """Concurrent spatial and channel squeeze-and-excitation (Roy et al., 2018), a drop-in for
    segmentation_models_pytorch.base.modules.SCSEModule (same arguments, submodules and
    state_dict: cSE.1, cSE.3, sSE.0).

    y = x * cSE(x) + x * sSE(x): cSE = sigmoid(conv(relu(conv(mean_hw(x))))) gates each channel,
    sSE = sigmoid(conv1x1(x)) (C channels to 1) each pixel. Both gates come from one read of x
    and the output from one more (attn_kernels/ops/scse.py)."""

    def __init__(self, in_channels: int, reduction: int = 16):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(reduction, int) or not 1 <= reduction <= in_channels:
            raise ValueError(f"reduction must be an int from 1 to in_channels ({in_channels}), got {reduction!r}")
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, in_channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels // reduction, in_channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(in_channels, 1, 1), nn.Sigmoid())

    def reference_forward(self, x: Tensor) -> Tensor:
        return x * self.cSE(x) + x * self.sSE(x)

    def fused_forward(self, x: Tensor) -> Tensor:
        fc1, fc2, sse = self.cSE[1], self.cSE[3], self.sSE[0]
        return F.scse(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, sse.weight, sse.bias)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs on, and why each backend before it was passed over."""
        return F.scse_dispatch(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.cSE[1].in_channels}, rd_channels={self.cSE[1].out_channels}"
