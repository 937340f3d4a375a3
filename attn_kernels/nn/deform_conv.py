"""Modulated deformable convolution drop-ins: torchvision's DeformConv2d and mmcv's
ModulatedDeformConv2dPack (DCNv2), on the fused implicit-GEMM kernels (attn_kernels/ops/deform_conv.py)."""
import math
from typing import Optional

import torch
from torch import Tensor, fx, nn
from torch.nn import init
from torch.nn.modules.utils import _pair

from .. import functional as F
from .. import reference
from ..backends import Dispatch
from .module import FusedModule, traced_call


class FusedDeformConv2d(FusedModule):
    """torchvision.ops.DeformConv2d: the same constructor, parameters (weight, bias), initialization,
    state_dict and repr; forward(input, offset, mask=None) as torchvision.ops.deform_conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's: Kaiming-uniform weight (a = sqrt(5)), bias uniform in +-1/sqrt(fan_in)."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self.reference_forward(input, offset, mask)
        if any(isinstance(t, fx.Proxy) for t in (input, offset, mask)):
            return traced_call(self, input, offset, mask)
        return self.fused_forward(input, offset, mask)

    def reference_forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return reference.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, mask)

    def fused_forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return F.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def dispatch(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Dispatch:
        """The backend forward(input, offset, mask) runs on, and why each backend before it was passed over."""
        return F.deform_conv2d_dispatch(input, offset, self.weight, self.bias, self.stride, self.padding,
                                        self.dilation, mask)

    def __repr__(self) -> str:  # torchvision's
        s = (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
             f", stride={self.stride}")
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        return s + ")"


class FusedModulatedDeformConv2dPack(FusedModule):
    """mmcv.ops.ModulatedDeformConv2dPack (registered in mmcv as 'DCNv2'): a conv predicts the
    offsets and masks from x, then a modulated deformable conv. The same constructor, parameters
    (weight, bias, conv_offset.weight, conv_offset.bias), initialization (mmcv's init_weights:
    weight uniform in +-1/sqrt(in_channels*kh*kw), bias and conv_offset zero) and forward:

        o1, o2, mask = chunk(conv_offset(x), 3, dim=1)
        out = modulated_deform_conv2d(x, cat(o1, o2), sigmoid(mask), weight, bias, ...)

    mmcv's offsets are (dy, dx) per tap in torchvision's order (modulated_deform_im2col_cuda:
    data_offset_h_ptr at channel 2*(i*kw + j), w at 2*(i*kw + j) + 1) and its bilinear sampling
    has the same bounds, so mmcv's op is torchvision's deform_conv2d with mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.transposed = False  # mmcv's, for compatibility with nn.Conv2d
        self.output_padding = (0,)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.init_weights()  # mmcv initializes twice (its base class, then the pack): the same random draws
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
                                     kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                     dilation=self.dilation, bias=True)
        self.init_weights()

    def init_weights(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        with torch.no_grad():
            self.weight.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.zero_()
            if hasattr(self, "conv_offset"):
                self.conv_offset.weight.zero_()
                self.conv_offset.bias.zero_()

    def _offset_and_mask(self, x: Tensor):
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(mask)

    def reference_forward(self, x: Tensor) -> Tensor:
        offset, mask = self._offset_and_mask(x)
        return reference.deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                       mask)

    def fused_forward(self, x: Tensor) -> Tensor:
        offset, mask = self._offset_and_mask(x)
        return F.deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def dispatch(self, x: Tensor) -> Dispatch:
        """The backend forward(x) runs its deformable conv on, and why each backend before it was passed over."""
        offset, mask = self._offset_and_mask(x)
        return F.deform_conv2d_dispatch(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                        mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")
