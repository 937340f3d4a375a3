"""Drop-in modules: the constructors, submodules and state_dict keys of timm's (mmcv's,
torchvision's, the papers'), fused kernels inside. One module per family; each family's file holds
its drop-ins and the small submodules that give them their state_dict keys:

  module.py            FusedModule, the base of every drop-in (eager, compile, fx, TorchScript)
  se.py                SE: timm's SEModule, EffectiveSEModule, SqueezeExcite; torchvision's SqueezeExcitation
  cbam.py              CBAM, its channel and spatial halves, light CBAM, the paper's CBAM
  eca.py               ECA, circular ECA, the paper's eca_layer
  gc.py                global context: timm's GlobalContext, mmcv's ContextBlock
  selective_kernel.py  Selective Kernel and its attention
  sam.py               YOLOv4's SAM, Residual Attention
  scse.py              scSE: segmentation_models_pytorch's SCSEModule
  non_local.py         non-local: timm's NonLocalAttn, mmcv's NonLocal2d
  deform_conv.py       modulated deformable convolution: torchvision's DeformConv2d, mmcv's ModulatedDeformConv2dPack
"""
from .cbam import (
    FusedCBAM, FusedCBAMOfficial, FusedChannelAttn, FusedLightCBAM, FusedLightChannelAttn, FusedLightSpatialAttn,
    FusedSpatialAttn,
)
from .deform_conv import FusedDeformConv2d, FusedModulatedDeformConv2dPack
from .eca import FusedCECA, FusedECA, FusedECAOfficial
from .gc import FusedContextBlock, FusedGC
from .module import FusedModule, make_divisible
from .non_local import FusedNonLocal2d, FusedNonLocalAttn, MMCVConvModule
from .sam import FusedResidualAttention, FusedSAM
from .scse import FusedSCSE
from .se import FusedEffectiveSE, FusedSE, FusedSqueezeExcitation, FusedSqueezeExcite
from .selective_kernel import FusedSelectiveKernel, FusedSelectiveKernelAttn

__all__ = [
    "FusedCBAM", "FusedCBAMOfficial", "FusedCECA", "FusedChannelAttn", "FusedContextBlock", "FusedDeformConv2d",
    "FusedECA",
    "FusedECAOfficial", "FusedEffectiveSE", "FusedGC", "FusedLightCBAM", "FusedLightChannelAttn",
    "FusedLightSpatialAttn", "FusedModulatedDeformConv2dPack", "FusedNonLocal2d", "FusedNonLocalAttn", "FusedResidualAttention", "FusedSAM", "FusedSCSE", "FusedSE",
    "FusedSelectiveKernel", "FusedSelectiveKernelAttn", "FusedSpatialAttn", "FusedSqueezeExcitation",
    "FusedSqueezeExcite", "FusedModule", "MMCVConvModule", "make_divisible",
]
