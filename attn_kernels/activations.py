"""Activation layers resolved as timm resolves them, and the formulas the fused ops apply.

The fused ops compute the tiny per-(n, c) part of a block (the SE bottleneck, its activation and
gate) in float32 with the formulas below, and differentiate them by hand, so every activation
here carries its derivative. An activation module with no entry in `kernel_activation_name`
sends the block to the reference backend instead of failing.
"""
import math
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "create_act_layer", "kernel_activation_name"]


class Activation(NamedTuple):
    forward: Callable[[torch.Tensor], torch.Tensor]
    # d forward(h) / dh, evaluated at the pre-activation h, with PyTorch's choice at kinks
    # (relu'(0) = 0, hardsigmoid' = 0 at +-3), so gradients match autograd's.
    derivative: Callable[[torch.Tensor], torch.Tensor]
    # (grad, h) -> grad * forward'(h) as PyTorch's backward computes it, for the piecewise
    # activations: it selects rather than multiplies, so a flat piece stops an inf or NaN grad
    # (0, where inf * 0 would be NaN), and a NaN h takes the branch PyTorch's comparisons take.
    # None: grad * derivative(h).
    selected_backward: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None

    def backward(self, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """d loss / dh from d loss / d forward(h), with PyTorch's NaN and inf behaviour."""
        if self.selected_backward is not None:
            return self.selected_backward(grad, h)
        return grad * self.derivative(h)


# PyTorch's hardsigmoid backward scales by 1/6 rounded to float32 in every dtype; so do we.
_ONE_SIXTH = float(torch.tensor(1 / 6, dtype=torch.float32))


def _silu_derivative(h):
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


def _gelu_derivative(h):
    return 0.5 * (1 + torch.erf(h * (1 / math.sqrt(2)))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


def _hardswish_derivative(h):
    # PyTorch's hardswish_backward: 0 up to -3 included, 1 from 3 included.
    return torch.where(h <= -3, torch.zeros_like(h), torch.where(h < 3, h / 3 + 0.5, torch.ones_like(h)))


# The piecewise backwards as PyTorch computes them (its CPU kernels for float32, float16 and
# bfloat16; for float64 they send a NaN h to 0 in relu6's and to NaN in hardswish's instead).
def _relu_backward(grad, h):
    return torch.where(h <= 0, torch.zeros_like(grad), grad)  # threshold_backward(grad, relu(h), 0)


def _relu6_backward(grad, h):
    return torch.where((h <= 0) | (h >= 6), torch.zeros_like(grad), grad)  # hardtanh_backward


def _hard_sigmoid_backward(grad, h):
    return torch.where((h > -3) & (h < 3), grad * _ONE_SIXTH, torch.zeros_like(grad))


def _hardswish_backward(grad, h):
    return torch.where(h <= -3, torch.zeros_like(grad), torch.where(h < 3, grad * (h / 3 + 0.5), grad))


ACTIVATIONS = {
    "identity": Activation(lambda h: h, torch.ones_like),
    "relu": Activation(F.relu, lambda h: (h > 0).to(h.dtype), _relu_backward),
    "relu6": Activation(F.relu6, lambda h: ((h > 0) & (h < 6)).to(h.dtype), _relu6_backward),
    "silu": Activation(F.silu, _silu_derivative),
    "gelu": Activation(F.gelu, _gelu_derivative),
    "tanh": Activation(torch.tanh, lambda h: 1 - torch.tanh(h) ** 2),
    "sigmoid": Activation(torch.sigmoid, lambda h: torch.sigmoid(h) * (1 - torch.sigmoid(h))),
    "hard_sigmoid": Activation(F.hardsigmoid, lambda h: ((h > -3) & (h < 3)).to(h.dtype) * _ONE_SIXTH,
                               _hard_sigmoid_backward),
    "hard_swish": Activation(F.hardswish, _hardswish_derivative, _hardswish_backward),
}

# Names timm accepts for layers; each maps to the class timm's create_act_layer would build
# (timm's own GELU, Sigmoid and Tanh classes compute the same functions as these).
_LAYERS = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid,
    "hard_swish": nn.Hardswish,
    "hardswish": nn.Hardswish,
}

_KERNEL_NAMES = {
    nn.Identity: "identity",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Hardsigmoid: "hard_sigmoid",
    nn.Hardswish: "hard_swish",
}
# timm.layers.activations classes that compute exactly the function of the same name.
_TIMM_KERNEL_NAMES = {"GELU": "gelu", "Sigmoid": "sigmoid", "Tanh": "tanh"}

LayerSpec = Union[str, type, Callable[..., nn.Module], None]


def create_act_layer(spec: LayerSpec, inplace: Optional[bool] = None, *, argument: str = "act_layer"):
    """Build an activation module from a name, a class or a factory, as timm's create_act_layer.

    Names outside the table above are looked up in timm when it is installed.
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        layer = _LAYERS.get(spec.lower())
        if layer is None:
            try:
                from timm.layers import get_act_layer
            except ImportError:
                raise ValueError(
                    f"{argument}={spec!r} is not a known activation name; without timm installed the "
                    f"known names are {sorted(_LAYERS)}"
                ) from None
            layer = get_act_layer(spec)
    elif callable(spec):
        layer = spec
    else:
        raise TypeError(f"{argument} must be an activation name, an nn.Module class or a factory, got {spec!r}")
    if inplace is None:
        return layer()
    try:
        return layer(inplace=inplace)
    except TypeError:  # the layer takes no inplace argument
        return layer()


def kernel_activation_name(module: Optional[nn.Module]) -> Optional[str]:
    """The ACTIVATIONS key computing what `module` computes, or None if the kernels lack it."""
    if module is None:
        return None
    kind = type(module)
    if kind is nn.GELU:
        return "gelu" if module.approximate == "none" else None
    if kind in _KERNEL_NAMES:
        return _KERNEL_NAMES[kind]
    if kind.__module__.startswith("timm.layers"):
        return _TIMM_KERNEL_NAMES.get(kind.__name__)
    return None
