"""FusedModule, the base of every drop-in and of the modules attn_kernels.patch fuses, and the
channel-width helpers the families share (timm's make_divisible)."""
import warnings

import torch
from torch import Tensor, fx, nn


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.make_divisible: round v to a multiple of divisor, not below round_limit * v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def reduced_channels(channels, rd_ratio, rd_channels, rd_divisor) -> int:
    """The bottleneck width of a channel MLP, as timm computes it."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    return rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


def traced_call(module: nn.Module, *inputs: fx.Proxy) -> fx.Proxy:
    """`module` applied to `inputs` under torch.fx symbolic tracing: one call_module node, so that
    the traced module runs the fused forward and makes its run-time choices (backend, dtype,
    sizes: none of which a symbolic trace can see) when it runs, as eager does. This holds under
    any tracer (torch.fx's own, torchvision's feature extraction, timm's), with no registry of
    leaf modules to keep. A fused module traced by itself (the root) has no parent to call it:
    its original computation is traced instead, with a warning."""
    tracer = inputs[0].tracer
    path = tracer.path_of_module(module)
    if path:
        return tracer.create_proxy("call_module", path, inputs, {})
    warnings.warn(f"torch.fx traces {type(module).__name__} by itself: the graph holds its original computation, "
                  "not the fused kernels (trace a model that contains it to keep it fused)", stacklevel=3)
    return module.reference_forward(*inputs)


class FusedModule(nn.Module):
    """Base of the fused drop-ins and of the modules attn_kernels.patch fuses.

    forward(x) runs `fused_forward`, the fused kernels, in eager mode and under torch.compile and
    torch.export (whose graphs hold the fused ops). Under torch.fx symbolic tracing the module is
    one call in the graph (see traced_call). TorchScript compiles `reference_forward` instead,
    the module's original computation in plain PyTorch ops (for a patched module, its own class's
    forward): the fused ops choose their kernels in Python at run time, and Triton kernels run
    only from Python, which a scripted model, made to run without Python, cannot call.
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone
            return self.reference_forward(x)
        if isinstance(x, fx.Proxy):
            return traced_call(self, x)
        return self.fused_forward(x)

    def fused_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reference_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __prepare_scriptable__(self):
        warnings.warn(f"torch.jit.script compiles {type(self).__name__}'s original computation, not its fused "
                      "kernels (attn_kernels.nn.FusedModule says why)", stacklevel=2)
        return self
