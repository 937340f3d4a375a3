"""Triton kernels, one file per family. Those with a CUDA twin (csrc/) have the signatures of the
compiled primitives; TRITON_ONLY lists the rest (the blocks whose kernels are Triton's alone:
Selective Kernel, the point-wise sigmoid gate, attention transfer, deformable convolution)."""
from .attention_pool import attention_pool, attention_pool_backward
from .channel_gate import channel_gate_apply, channel_grad_reduce, channel_pool, launch_gate_apply
from .deform_conv import deform_conv2d, deform_conv2d_backward
from .excite import grad_excite, pool_excite
from .gc import gc_apply, gc_grad_transform, gc_pool_transform
from .path_mix import path_grad_apply, path_grad_reduce, path_mix
from .power_mean import channel_power_mean, channel_power_mean_backward
from .scse import scse_apply, scse_grad_excite, scse_pool_excite
from .sigmoid_gate import sigmoid_gate_apply, sigmoid_gate_grad
from .spatial_gate import spatial_gate_apply, spatial_grad_reduce, spatial_pool, spatial_pool_grad_reduce

__all__ = [
    "attention_pool", "attention_pool_backward",
    "channel_gate_apply", "channel_grad_reduce", "channel_pool", "channel_power_mean", "channel_power_mean_backward",
    "deform_conv2d", "deform_conv2d_backward", "gc_apply", "gc_grad_transform", "gc_pool_transform", "grad_excite",
    "launch_gate_apply", "pool_excite",
    "path_grad_apply", "path_grad_reduce", "path_mix", "scse_apply", "scse_grad_excite", "scse_pool_excite",
    "sigmoid_gate_apply",
    "sigmoid_gate_grad", "spatial_gate_apply", "spatial_grad_reduce", "spatial_pool", "spatial_pool_grad_reduce",
]

TRITON_ONLY = (
    "channel_power_mean", "channel_power_mean_backward", "deform_conv2d", "deform_conv2d_backward", "gc_apply",
    "gc_grad_transform", "gc_pool_transform", "grad_excite",
    "launch_gate_apply", "pool_excite", "scse_apply", "scse_grad_excite", "scse_pool_excite",
    "path_grad_apply", "path_grad_reduce", "path_mix", "sigmoid_gate_apply", "sigmoid_gate_grad",
)
