"""attn_kernels: fused CUDA and Triton kernels for the attention blocks of CNNs.

    import attn_kernels
    se = attn_kernels.FusedSE(256).cuda()        # drop-in for timm.layers.SEModule
    cbam = attn_kernels.FusedCBAM(256).cuda()    # drop-in for timm.layers.cbam.CbamModule
    eca = attn_kernels.FusedECA(256).cuda()      # drop-in for timm.layers.EcaModule
    gc = attn_kernels.FusedGC(256).cuda()        # drop-in for timm.layers.GlobalContext
    sk = attn_kernels.FusedSelectiveKernel(256)  # drop-in for timm.layers.SelectiveKernel
    nl = attn_kernels.FusedNonLocalAttn(256)     # drop-in for timm.layers.NonLocalAttn (SDPA inside)
    sam = attn_kernels.FusedSAM(256)             # YOLOv4's SAM: x * sigmoid(conv(x))
    scse = attn_kernels.FusedSCSE(256)           # drop-in for segmentation_models_pytorch's SCSEModule
    dcn = attn_kernels.FusedDeformConv2d(256, 256, 3, padding=1)  # drop-in for torchvision.ops.DeformConv2d
    loss = attn_kernels.at_loss(f_student, f_teacher)   # attention transfer
    with attn_kernels.use_backend("triton"):     # 'auto' (default), 'cuda', 'triton', 'reference'
        y = se(x)
    print(se.dispatch(x))                        # which backend runs, and why others did not
    attn_kernels.patch(model, verbose=True)      # fuse the attention modules of a timm/torchvision model
"""
from . import functional, reference
from .backends import BACKENDS, Dispatch, get_backend, set_backend, use_backend
from .functional import at_loss, at_map
from .nn import (
    FusedCBAM, FusedCBAMOfficial, FusedCECA, FusedChannelAttn, FusedContextBlock, FusedDeformConv2d, FusedECA,
    FusedECAOfficial, FusedEffectiveSE, FusedGC, FusedLightCBAM, FusedLightChannelAttn, FusedLightSpatialAttn,
    FusedModulatedDeformConv2dPack, FusedNonLocal2d, FusedNonLocalAttn, FusedResidualAttention, FusedSAM, FusedSCSE,
    FusedSE, FusedSelectiveKernel, FusedSelectiveKernelAttn, FusedSpatialAttn, FusedSqueezeExcitation,
    FusedSqueezeExcite,
)
from .patch import PatchReport, patch, patch_report, unpatch

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "Dispatch", "FusedCBAM", "FusedCBAMOfficial", "FusedCECA", "FusedChannelAttn",
    "FusedContextBlock", "FusedDeformConv2d", "FusedECA", "FusedECAOfficial", "FusedEffectiveSE", "FusedGC",
    "FusedLightCBAM", "FusedLightChannelAttn", "FusedLightSpatialAttn", "FusedModulatedDeformConv2dPack",
    "FusedNonLocal2d", "FusedNonLocalAttn", "FusedResidualAttention", "FusedSAM", "FusedSCSE", "FusedSE",
    "FusedSelectiveKernel", "FusedSelectiveKernelAttn", "FusedSpatialAttn", "FusedSqueezeExcitation",
    "FusedSqueezeExcite", "PatchReport", "at_loss", "at_map", "functional", "get_backend", "patch",
    "patch_report", "reference", "set_backend", "unpatch", "use_backend",
]
