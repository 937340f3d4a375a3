"""Fused attention blocks as functions: argument checks, backend dispatch, then the op.

Each function has the signature of its reference in attn_kernels.reference and computes the same
thing; the modules in attn_kernels.nn call these.
"""
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import reference
from .activations import ACTIVATIONS, kernel_activation_name
from .backends import Dispatch, dispatch
from .ops.cbam import cbam_forward
from .ops.channel_gate import channel_gate_forward
from .ops.excite import POOLS
from .ops.gc import gc_forward
from .ops.primitives import ATTENTION_POOL_MAX_CHANNELS

Act = Union[str, Callable[[Tensor], Tensor]]

__all__ = [
    "cbam", "cbam_dispatch", "channel_attn", "eca", "eca_dispatch", "gate_dispatch", "gc", "gc_dispatch", "se",
]


def _kernel_name(act: Act, argument: str) -> Optional[str]:
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"{argument} must be one of {sorted(ACTIVATIONS)} or a module, got {act!r}")
        return act
    if not callable(act):
        raise TypeError(f"{argument} must be an activation name or a callable, got {type(act).__name__}")
    return kernel_activation_name(act) if isinstance(act, nn.Module) else None


def _no_formula(argument: str, act: Act) -> str:
    """Why a block whose `argument` (act or gate) is `act` runs on the reference."""
    return f"{argument} {act!r} has no fused formula (fused: {', '.join(sorted(ACTIVATIONS))})"


def _check_tensor(name: str, t: Optional[Tensor], shape: tuple, x: Tensor, optional: bool = False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on the same device")


def _check_activation_input(x: Tensor):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32, float64), got dtype {x.dtype}")
    if x.shape[2] * x.shape[3] == 0 and x.shape[0] * x.shape[1] != 0:
        raise ValueError(f"x must have H*W >= 1 to pool over, got shape {tuple(x.shape)}")



def _shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_optional=False):
    """x and the weights of a channel MLP: 1x1-conv (R, C, 1, 1) or linear (R, C) weights. With
    fc1_optional, fc1 may be absent: fc2 alone is then a (C, C) layer."""
    _check_activation_input(x)
    channels = x.shape[1]
    if fc1_weight is None and fc1_optional:
        if fc1_bias is not None:
            raise ValueError("fc1_bias must be None when fc1_weight is None")
        if not isinstance(fc2_weight, Tensor) or fc2_weight.dim() not in (2, 4):
            raise ValueError(f"fc2_weight must be a ({channels}, {channels}, 1, 1) or ({channels}, {channels}) "
                             f"tensor without fc1_weight, got {_shape_of(fc2_weight)}")
        tail = (1, 1) if fc2_weight.dim() == 4 else ()
        _check_tensor("fc2_weight", fc2_weight, (channels, channels, *tail), x)
        _check_tensor("fc2_bias", fc2_bias, (channels,), x, optional=True)
        return
    if not isinstance(fc1_weight, Tensor) or fc1_weight.dim() not in (2, 4):
        raise ValueError(
            f"fc1_weight must be a (rd_channels, channels, 1, 1) or (rd_channels, channels) tensor, got "
            f"{_shape_of(fc1_weight)}"
        )
    rd_channels = fc1_weight.shape[0]
    if fc1_weight.shape[1] != channels:
        raise ValueError(f"x has {channels} channels but fc1_weight expects {fc1_weight.shape[1]}")
    tail = (1, 1) if fc1_weight.dim() == 4 else ()
    _check_tensor("fc1_weight", fc1_weight, (rd_channels, channels, *tail), x)
    _check_tensor("fc1_bias", fc1_bias, (rd_channels,), x, optional=True)
    _check_tensor("fc2_weight", fc2_weight, (channels, rd_channels, *tail), x)
    _check_tensor("fc2_bias", fc2_bias, (channels,), x, optional=True)


def _gate_plan(x, act, gate, norm=None):
    """(dispatch, act kernel name, gate kernel name) for a gated block on x with this configuration."""
    act_name, gate_name = _kernel_name(act, "act"), _kernel_name(gate, "gate")
    reason = None
    if norm is not None:
        reason = f"norm {type(norm).__name__} between fc1 and act has no fused kernel"
    elif act_name is None:
        reason = _no_formula("act", act)
    elif gate_name is None:
        reason = _no_formula("gate", gate)
    return dispatch(x, reason), act_name, gate_name


def gate_dispatch(
    x: Tensor, *, act: Act = "relu", gate: Act = "sigmoid", norm: Optional[Callable[[Tensor], Tensor]] = None
) -> Dispatch:
    """Which backend a gated block (se, channel_attn) runs on x with this act, gate and norm, and
    why the backends before it were passed over."""
    return _gate_plan(x, act, gate, norm)[0]


def se(
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    add_maxpool: bool = False,
    act: Act = "relu",
    gate: Act = "sigmoid",
    norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Squeeze-and-Excitation, as timm's SEModule: x * gate(fc2(act(norm(fc1(mean_hw(x)))))).

    fc weights are 1x1-conv weights, (rd_channels, C, 1, 1) and (C, rd_channels, 1, 1). `act` and
    `gate` are names from attn_kernels.activations.ACTIVATIONS or modules; anything the kernels lack
    (another callable, a `norm`) runs through the reference. Without fc1 (fc1_weight and fc1_bias
    None), timm's EffectiveSEModule: x * gate(fc2(pool(x))) with fc2 (C, C, 1, 1); act and norm unused.
    """
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_optional=True)
    if fc1_weight is None:
        act, norm = "identity", None
    choice, act_name, gate_name = _gate_plan(x, act, gate, norm)
    if choice.backend == "reference":
        return reference.se(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_maxpool=add_maxpool, act=act, gate=gate, norm=norm
        )
    pool = "mix" if add_maxpool else "avg"
    return channel_gate_forward(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, "mlp", act_name, gate_name, choice.backend
    )[0]


def channel_attn(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    pool: str = "avg+max",
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> Tensor:
    """CBAM's channel attention, as timm's ChannelAttn: x * gate(mlp(mean_hw(x)) + mlp(max_hw(x)))
    with mlp(p) = fc2(act(fc1(p))) shared by both branches; pool 'avg' or 'max' keeps one branch,
    'mix' is timm's LightChannelAttn: x * gate(mlp(0.5 * mean_hw(x) + 0.5 * max_hw(x))).
    Weights are 1x1-conv (as in `se`) or linear (rd_channels, C) and (C, rd_channels)."""
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _check_pool(pool)
    choice, act_name, gate_name = _gate_plan(x, act, gate)
    if choice.backend == "reference":
        return reference.channel_attn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool=pool, act=act, gate=gate)
    return channel_gate_forward(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, "mlp", act_name, gate_name, choice.backend
    )[0]


def _check_eca(x, conv_weight, conv_bias, conv2_weight, conv2_bias, circular):
    _check_activation_input(x)

    def shape_of(t):
        return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__

    if conv2_weight is None:
        if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 3 or conv_weight.shape[:2] != (1, 1) \
                or conv_weight.shape[2] % 2 == 0:
            raise ValueError(f"conv_weight must be a (1, 1, k) tensor with odd k, got {shape_of(conv_weight)}")
        taps = conv_weight
        _check_tensor("conv_bias", conv_bias, (1,), x, optional=True)
    else:
        if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 3 or conv_weight.shape[1:] != (1, 1):
            raise ValueError(f"conv_weight must be a (rd_channels, 1, 1) tensor with conv2_weight, got {shape_of(conv_weight)}")
        rd_channels = conv_weight.shape[0]
        if not isinstance(conv2_weight, Tensor) or conv2_weight.dim() != 3 \
                or conv2_weight.shape[:2] != (1, rd_channels) or conv2_weight.shape[2] % 2 == 0:
            raise ValueError(
                f"conv2_weight must be a (1, {rd_channels}, k) tensor with odd k, got {shape_of(conv2_weight)}"
            )
        taps = conv2_weight
        _check_tensor("conv_bias", conv_bias, (rd_channels,), x, optional=True)
        _check_tensor("conv2_weight", conv2_weight, tuple(conv2_weight.shape), x)
        _check_tensor("conv2_bias", conv2_bias, (1,), x, optional=True)
    _check_tensor("conv_weight", conv_weight, tuple(conv_weight.shape), x)
    pad = taps.shape[-1] // 2
    if circular and x.shape[1] < pad:
        raise ValueError(
            f"x has {x.shape[1]} channels; circular padding by {pad} (kernel size {taps.shape[-1]}) needs at least {pad}"
        )


def eca_dispatch(x: Tensor, *, conv2_weight: Optional[Tensor] = None, act: Act = "relu", gate: Act = "sigmoid") -> Dispatch:
    """Which backend eca() runs on x with this configuration, and why others were passed over."""
    return _gate_plan(x, _eca_act(conv2_weight, act), gate)[0]


def _eca_act(conv2_weight: Optional[Tensor], act: Act) -> Act:
    """The activation ECA applies: `act` between its two convs, none without conv2."""
    return act if conv2_weight is not None else "identity"


def eca(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    conv2_weight: Optional[Tensor] = None,
    conv2_bias: Optional[Tensor] = None,
    *,
    circular: bool = False,
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> Tensor:
    """Efficient Channel Attention, as timm's EcaModule (CecaModule with circular=True):
    x * gate(conv1d across the channels of mean_hw(x)), with Conv1d(1, 1, k) weight (1, 1, k).

    With conv2_weight, EcaModule's use_mlp form: conv_weight (R, 1, 1) and conv_bias (R,) make R
    maps of the pooled vector, `act` acts on them, and conv2_weight (1, R, k) with conv2_bias (1,)
    mixes them across channels. `act` is unused without conv2_weight.
    """
    _check_eca(x, conv_weight, conv_bias, conv2_weight, conv2_bias, circular)
    choice, act_name, gate_name = _gate_plan(x, _eca_act(conv2_weight, act), gate)
    if choice.backend == "reference":
        return reference.eca(x, conv_weight, conv_bias, conv2_weight, conv2_bias, circular=circular, act=act, gate=gate)
    if conv2_weight is None:
        first, second = (None, None), (conv_weight, conv_bias)
    else:
        first, second = (conv_weight, conv_bias), (conv2_weight, conv2_bias)
    mix = "circular_conv" if circular else "conv"
    return channel_gate_forward(x, *first, *second, "avg", mix, act_name, gate_name, choice.backend)[0]


def _check_pool(pool):
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))}, got {pool!r}")


def _cbam_plan(x, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, act, gate):
    """(dispatch, act kernel name, gate kernel name) for cbam() on x with this configuration."""
    _check_activation_input(x)
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4 or conv_weight.shape[:2] != (1, 2) \
            or conv_weight.shape[2] != conv_weight.shape[3] or conv_weight.shape[2] % 2 == 0:
        raise ValueError(
            "conv_weight must be a (1, 2, k, k) tensor with odd k, got "
            f"{tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight).__name__}"
        )
    _check_tensor("conv_weight", conv_weight, tuple(conv_weight.shape), x)
    for name, t in (("bn_running_mean", bn_running_mean), ("bn_running_var", bn_running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_tensor(name, t, (1,), x, optional=True)
    act_name, gate_name = _kernel_name(act, "act"), _kernel_name(gate, "gate")
    reason = None
    if bn_weight is None or bn_bias is None:
        reason = "a BatchNorm without affine weight and bias has no fused kernel"
    elif not bn_training and (bn_running_mean is None or bn_running_var is None):
        reason = "BatchNorm normalizes with batch statistics in eval (no running statistics): no fused kernel"
    elif bn_training and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        reason = "BatchNorm in training needs more than one value per channel"
    elif act_name is None:
        reason = _no_formula("act", act)
    elif gate_name is None:
        reason = _no_formula("gate", gate)
    return dispatch(x, reason), act_name, gate_name


def cbam_dispatch(x: Tensor, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, *,
                  bn_training: bool = False, act: Act = "relu", gate: Act = "sigmoid") -> Dispatch:
    """Which backend cbam() runs on x with this configuration, and why others were passed over."""
    return _cbam_plan(x, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, act, gate)[0]


def cbam(
    x: Tensor,
    fc1_weight: Optional[Tensor],
    fc1_bias: Optional[Tensor],
    fc2_weight: Optional[Tensor],
    fc2_bias: Optional[Tensor],
    conv_weight: Tensor,
    bn_running_mean: Optional[Tensor],
    bn_running_var: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    *,
    bn_training: bool = False,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    pool: str = "avg+max",
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> Tensor:
    """CBAM as timm's CbamModule: channel attention (see channel_attn) then spatial attention
    u * gate(BN(conv_kxk([mean_c u, max_c u]))) on its output u. Without fc1_weight (and the other
    MLP weights None), spatial attention alone, as timm's SpatialAttn.

    conv_weight is (1, 2, k, k), the BN arguments are those of F.batch_norm, and in training the
    running statistics are updated in place as F.batch_norm does (bn_momentum is its factor).
    """
    channel = fc1_weight is not None
    if channel:
        _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _check_pool(pool)
    choice, act_name, gate_name = _cbam_plan(
        x, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, act, gate
    )
    if choice.backend == "reference":
        return reference.cbam(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_running_mean, bn_running_var,
            bn_weight, bn_bias, bn_training=bn_training, bn_momentum=bn_momentum, bn_eps=bn_eps, pool=pool, act=act,
            gate=gate,
        )
    y, *_, bn_mean, bn_var = cbam_forward(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias,
        bn_running_mean, bn_running_var, bn_training, bn_eps, pool, act_name, gate_name, choice.backend,
    )
    if bn_training and bn_running_mean is not None and bn_running_var is not None:
        count = x.shape[0] * x.shape[2] * x.shape[3]
        with torch.no_grad():  # as F.batch_norm: running variance with Bessel's correction
            bn_running_mean.mul_(1 - bn_momentum).add_(bn_mean.to(bn_running_mean.dtype), alpha=bn_momentum)
            bn_running_var.mul_(1 - bn_momentum).add_(
                bn_var.to(bn_running_var.dtype) * (count / (count - 1)), alpha=bn_momentum
            )
    return y


_GC_WEIGHT_NAMES = ("fc1_weight", "fc1_bias", "ln_weight", "ln_bias", "fc2_weight", "fc2_bias")


def _check_gc_transform(name: str, weights, x) -> List[Tensor]:
    """A GC transform's six tensors (see ops/gc.py) as a list; [] when absent."""
    if weights is None:
        return []
    weights = list(weights)
    if len(weights) != 6:
        raise ValueError(f"{name} must hold the 6 tensors {', '.join(_GC_WEIGHT_NAMES)}, got {len(weights)}")
    w1 = weights[0]
    if not isinstance(w1, Tensor) or w1.dim() != 4 or w1.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(
            f"{name}[0] (fc1_weight) must be a (rd_channels, {x.shape[1]}, 1, 1) tensor, got "
            f"{tuple(w1.shape) if isinstance(w1, Tensor) else type(w1).__name__}"
        )
    R, C = w1.shape[0], x.shape[1]
    # LayerNorm affine parameters: (R,) from timm's LayerNorm2d, (R, 1, 1) from mmcv's LayerNorm([R, 1, 1]).
    ln_shape = (R, 1, 1) if isinstance(weights[2], Tensor) and weights[2].dim() == 3 else (R,)
    for i, shape in enumerate([(R, C, 1, 1), (R,), ln_shape, ln_shape, (C, R, 1, 1), (C,)]):
        _check_tensor(f"{name}[{i}] ({_GC_WEIGHT_NAMES[i]})", weights[i], shape, x)
    return weights


def _gc_plan(x, attn_weight, attn_bias, scale_weights, add_weights, act, gate):
    """(dispatch, act name, gate name, scale list, add list) for gc() on x with this configuration."""
    _check_activation_input(x)
    if attn_weight is not None:
        _check_tensor("attn_weight", attn_weight, (1, x.shape[1], 1, 1), x)
        _check_tensor("attn_bias", attn_bias, (1,), x, optional=True)
    scale = _check_gc_transform("scale_weights", scale_weights, x)
    add = _check_gc_transform("add_weights", add_weights, x)
    act_name, gate_name = _kernel_name(act, "act"), _kernel_name(gate, "gate")
    reason = None
    if not scale and not add:
        reason = "neither a scale nor an add transform: the block returns x, there is nothing to fuse"
    elif attn_weight is not None and x.shape[1] > ATTENTION_POOL_MAX_CHANNELS:
        reason = (f"x has {x.shape[1]} channels; the attention-pooling kernels hold a pixel's channels on chip "
                  f"and take at most {ATTENTION_POOL_MAX_CHANNELS}")
    elif act_name is None:
        reason = _no_formula("act", act)
    elif gate_name is None and scale:
        reason = _no_formula("gate", gate)
    return dispatch(x, reason), act_name, gate_name or "sigmoid", scale, add


def gc_dispatch(x: Tensor, attn_weight: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None,
                scale_weights: Optional[Sequence[Tensor]] = None, add_weights: Optional[Sequence[Tensor]] = None,
                *, act: Act = "relu", gate: Act = "sigmoid") -> Dispatch:
    """Which backend gc() runs on x with these weights, and why others were passed over."""
    return _gc_plan(x, attn_weight, attn_bias, scale_weights, add_weights, act, gate)[0]


def gc(
    x: Tensor,
    attn_weight: Optional[Tensor],
    attn_bias: Optional[Tensor],
    scale_weights: Optional[Sequence[Tensor]],
    add_weights: Optional[Sequence[Tensor]],
    *,
    scale_eps: float = 1e-6,
    add_eps: float = 1e-6,
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> Tensor:
    """Global context attention, as timm's GlobalContext (mmcv's ContextBlock through options):
    y = x * gate(t_scale(context)) + t_add(context), the context pooled by attention (softmax over
    H*W of the 1x1 conv attn_weight (1, C, 1, 1), attn_bias (1,)) or, without attn_weight, the mean.

    A transform is the list [fc1_weight, fc1_bias, ln_weight, ln_bias, fc2_weight, fc2_bias]:
    fc1 (R, C, 1, 1), LayerNorm over the R hidden channels (affine (R,) or (R, 1, 1), eps
    scale_eps / add_eps), act, fc2 (C, R, 1, 1); None leaves the term out.
    """
    choice, act_name, gate_name, scale, add = _gc_plan(x, attn_weight, attn_bias, scale_weights, add_weights, act, gate)
    if choice.backend == "reference":
        return reference.gc(x, attn_weight, attn_bias, scale, add, scale_eps=scale_eps, add_eps=add_eps, act=act,
                            gate=gate)
    return gc_forward(x, attn_weight, attn_bias, scale, add, scale_eps, add_eps, act_name, gate_name,
                      choice.backend)[0]
