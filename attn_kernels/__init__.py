"""attn_kernels: fused CUDA and Triton kernels for the attention blocks of CNNs.

    import attn_kernels
    se = attn_kernels.FusedSE(256).cuda()        # drop-in for timm.layers.SEModule
    cbam = attn_kernels.FusedCBAM(256).cuda()    # drop-in for timm.layers.cbam.CbamModule
    with attn_kernels.use_backend("triton"):     # 'auto' (default), 'cuda', 'triton', 'reference'
        y = se(x)
    print(se.dispatch(x))                        # which backend runs, and why others did not
"""
from . import functional, reference
from .backends import BACKENDS, Dispatch, get_backend, set_backend, use_backend
from .nn import FusedCBAM, FusedCBAMOfficial, FusedChannelAttn, FusedSE, FusedSpatialAttn

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "Dispatch", "FusedCBAM", "FusedCBAMOfficial", "FusedChannelAttn", "FusedSE", "FusedSpatialAttn",
    "functional", "get_backend", "reference", "set_backend", "use_backend",
]
