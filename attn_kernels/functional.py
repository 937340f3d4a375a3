"""Fused attention blocks as functions: argument checks, backend dispatch, then the op.

Each function has the signature of its reference in attn_kernels.reference and computes the same
thing; the modules in attn_kernels.nn call these.
"""
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import batch_norm, reference
from .activations import ACTIVATIONS, kernel_activation_name
from .backends import KERNEL_BACKENDS, Dispatch, dispatch, get_backend
from .ops.cbam import cbam_forward
from .ops.deform_conv import deform_conv2d_forward
from .ops.channel_gate import channel_gate
from .ops.excite import POOLS
from .ops.attention_transfer import channel_power_mean
from .ops import gc as gc_ops
from .ops.primitives import ATTENTION_POOL_MAX_CHANNELS, MAX_PATHS, acc_dtype
from .ops.scse import scse as scse_op
from .ops.selective_kernel import selective_kernel_forward
from .ops.sigmoid_gate import is_spatial, sigmoid_gate_forward

Act = Union[str, Callable[[Tensor], Tensor]]

__all__ = [
    "at_loss", "at_map", "at_map_dispatch", "cbam", "cbam_dispatch", "channel_attn", "deform_conv2d",
    "deform_conv2d_dispatch", "eca", "eca_dispatch",
    "gate_dispatch", "gc", "gc_dispatch", "non_local", "non_local_dispatch", "residual_attention", "sam", "scse",
    "scse_dispatch", "se",
    "selective_kernel", "selective_kernel_dispatch", "sigmoid_gate", "sigmoid_gate_dispatch",
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
    return channel_gate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, "mlp", act_name, gate_name, choice.backend)


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
    return channel_gate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, "mlp", act_name, gate_name, choice.backend)


def _check_scse(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias):
    _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _check_tensor("sse_weight", sse_weight, (1, x.shape[1], 1, 1), x)
    _check_tensor("sse_bias", sse_bias, (1,), x, optional=True)


def _too_many_channels(x: Tensor, kernels: str) -> Optional[str]:
    """Why the pixel-tile kernels (`kernels`: attention pooling, scSE) cannot take x, or None."""
    if x.shape[1] <= ATTENTION_POOL_MAX_CHANNELS:
        return None
    return (f"x has {x.shape[1]} channels; the {kernels} kernels hold a pixel's channels on chip "
            f"and take at most {ATTENTION_POOL_MAX_CHANNELS}")


def _scse_plan(x: Tensor) -> Dispatch:
    return dispatch(x, _too_many_channels(x, "scSE"))


def scse_dispatch(x: Tensor) -> Dispatch:
    """Which backend scse() runs on x, and why others were passed over."""
    return _scse_plan(x)


def scse(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    sse_weight: Tensor,
    sse_bias: Optional[Tensor],
) -> Tensor:
    """Concurrent spatial and channel squeeze-and-excitation, as segmentation_models_pytorch's
    SCSEModule: x * sigmoid(fc2(relu(fc1(mean_hw(x))))) + x * sigmoid(sse(x)), sse a 1x1 conv
    from C channels to 1. fc weights as in `se` (1x1-conv or linear); sse_weight (1, C, 1, 1)."""
    _check_scse(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias)
    choice = _scse_plan(x)
    if choice.backend == "reference":
        return reference.scse(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias)
    return scse_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias, choice.backend)


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
    return channel_gate(x, *first, *second, "avg", mix, act_name, gate_name, choice.backend)


def _check_pool(pool):
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))}, got {pool!r}")


def _batch_norm_reason(x, channels: int, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training: bool,
                       values_per_channel: int, bn_group: str = "") -> Optional[str]:
    """Checks a fused BatchNorm's tensors ((channels,) each, optional) and says why its
    configuration has no fused kernel, or None. Synchronized (bn_group), the values per channel
    are the whole group's, which only the op's all-reduce counts."""
    if not isinstance(bn_group, str):
        raise TypeError(f"bn_group must be a process group's name (str, '' for none), got {type(bn_group).__name__}")
    for name, t in (("bn_running_mean", bn_running_mean), ("bn_running_var", bn_running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_tensor(name, t, (channels,), x, optional=True)
    if bn_weight is None or bn_bias is None:
        return "a BatchNorm without affine weight and bias has no fused kernel"
    if not bn_training and (bn_running_mean is None or bn_running_var is None):
        return "BatchNorm normalizes with batch statistics in eval (no running statistics): no fused kernel"
    if bn_training and values_per_channel <= 1 and not bn_group:
        return "BatchNorm in training needs more than one value per channel"
    return None


def _cbam_plan(x, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_group, act, gate):
    """(dispatch, act kernel name, gate kernel name) for cbam() on x with this configuration."""
    _check_activation_input(x)
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4 or conv_weight.shape[:2] != (1, 2) \
            or conv_weight.shape[2] != conv_weight.shape[3] or conv_weight.shape[2] % 2 == 0:
        raise ValueError(
            "conv_weight must be a (1, 2, k, k) tensor with odd k, got "
            f"{tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight).__name__}"
        )
    _check_tensor("conv_weight", conv_weight, tuple(conv_weight.shape), x)
    reason = _batch_norm_reason(x, 1, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training,
                                x.shape[0] * x.shape[2] * x.shape[3], bn_group)
    act_name, gate_name = _kernel_name(act, "act"), _kernel_name(gate, "gate")
    if reason is None and act_name is None:
        reason = _no_formula("act", act)
    elif reason is None and gate_name is None:
        reason = _no_formula("gate", gate)
    return dispatch(x, reason), act_name, gate_name


def cbam_dispatch(x: Tensor, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, *,
                  bn_training: bool = False, bn_group: str = "", act: Act = "relu", gate: Act = "sigmoid") -> Dispatch:
    """Which backend cbam() runs on x with this configuration, and why others were passed over."""
    return _cbam_plan(x, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_group,
                      act, gate)[0]


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
    bn_group: str = "",
    pool: str = "avg+max",
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> Tensor:
    """CBAM as timm's CbamModule: channel attention (see channel_attn) then spatial attention
    u * gate(BN(conv_kxk([mean_c u, max_c u]))) on its output u. Without fc1_weight (and the other
    MLP weights None), spatial attention alone, as timm's SpatialAttn.

    conv_weight is (1, 2, k, k), the BN arguments are those of F.batch_norm, and in training the
    running statistics are updated in place as F.batch_norm does (bn_momentum is its factor).
    bn_group, a process group's name (attn_kernels.batch_norm.group_name), makes the BatchNorm's
    batch in training the whole group's, as nn.SyncBatchNorm's.
    """
    channel = fc1_weight is not None
    if channel:
        _check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    _check_pool(pool)
    choice, act_name, gate_name = _cbam_plan(
        x, conv_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_group, act, gate
    )
    if choice.backend == "reference":
        return reference.cbam(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_running_mean, bn_running_var,
            bn_weight, bn_bias, bn_training=bn_training, bn_momentum=bn_momentum, bn_eps=bn_eps, bn_group=bn_group,
            pool=pool, act=act, gate=gate,
        )
    y, *_, bn_mean, bn_var, bn_count = cbam_forward(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias,
        bn_running_mean, bn_running_var, bn_training, bn_eps, bn_group, pool, act_name, gate_name, choice.backend,
    )
    if bn_training:
        batch_norm.update_running_stats(bn_running_mean, bn_running_var, bn_mean, bn_var, bn_count, bn_momentum)
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
    elif attn_weight is not None and (too_many := _too_many_channels(x, "attention-pooling")):
        reason = too_many
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
    return gc_ops.gc(x, attn_weight, attn_bias, scale, add, scale_eps, add_eps, act_name, gate_name, choice.backend)


TRITON_ONLY = ("triton",)  # the kernel backends of the blocks below with a kernel of their own


def _check_paths(paths) -> List[Tensor]:
    if not isinstance(paths, (list, tuple)) or not paths:
        raise TypeError(f"paths must be a non-empty list of tensors, got {type(paths).__name__}")
    for i, p in enumerate(paths):
        if i == 0:
            _check_activation_input(p)
        elif not isinstance(p, Tensor) or p.shape != paths[0].shape or p.dtype != paths[0].dtype \
                or p.device != paths[0].device:
            raise ValueError(f"paths[{i}] must be a tensor of paths[0]'s shape, dtype and device "
                             f"({tuple(paths[0].shape)}, {paths[0].dtype}, {paths[0].device}), got "
                             f"{_shape_of(p)}" + (f" {p.dtype} on {p.device}" if isinstance(p, Tensor) else ""))
    return list(paths)


def _selective_kernel_plan(paths, fc_reduce_weight, fc_select_weight, bn_running_mean, bn_running_var, bn_weight,
                           bn_bias, bn_training, bn_group, act):
    """(dispatch, act kernel name) for selective_kernel() with this configuration."""
    paths = _check_paths(paths)
    x = paths[0]
    C, P = x.shape[1], len(paths)
    if not isinstance(fc_reduce_weight, Tensor) or fc_reduce_weight.dim() not in (2, 4) or fc_reduce_weight.shape[1] != C:
        raise ValueError(f"fc_reduce_weight must be an (attn_channels, {C}, 1, 1) or (attn_channels, {C}) tensor, got "
                         f"{_shape_of(fc_reduce_weight)}")
    A = fc_reduce_weight.shape[0]
    tail = (1, 1) if fc_reduce_weight.dim() == 4 else ()
    _check_tensor("fc_reduce_weight", fc_reduce_weight, (A, C, *tail), x)
    _check_tensor("fc_select_weight", fc_select_weight, (P * C, A, *tail), x)
    bn_reason = _batch_norm_reason(x, A, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, x.shape[0],
                                   bn_group)
    act_name = _kernel_name(act, "act")
    reason = None
    if P > MAX_PATHS:
        reason = f"{P} paths; the kernels take at most {MAX_PATHS}"
    elif any(p.stride() != x.stride() for p in paths[1:] if p.numel()):
        reason = "the paths lie in different memory layouts"
    elif bn_reason is not None:
        reason = bn_reason
    elif act_name is None:
        reason = _no_formula("act", act)
    return dispatch(x, reason, TRITON_ONLY), act_name


def selective_kernel_dispatch(paths: Sequence[Tensor], fc_reduce_weight, fc_select_weight, bn_running_mean=None,
                              bn_running_var=None, bn_weight=None, bn_bias=None, *, bn_training: bool = False,
                              bn_group: str = "", act: Act = "relu") -> Dispatch:
    """Which backend selective_kernel() runs on these paths, and why others were passed over."""
    return _selective_kernel_plan(paths, fc_reduce_weight, fc_select_weight, bn_running_mean, bn_running_var,
                                  bn_weight, bn_bias, bn_training, bn_group, act)[0]


def selective_kernel(
    paths: Sequence[Tensor],
    fc_reduce_weight: Tensor,
    fc_select_weight: Tensor,
    bn_running_mean: Optional[Tensor],
    bn_running_var: Optional[Tensor],
    bn_weight: Optional[Tensor],
    bn_bias: Optional[Tensor],
    *,
    bn_training: bool = False,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    bn_group: str = "",
    act: Act = "relu",
) -> Tensor:
    """Selective Kernel attention over the branch outputs `paths` (P tensors (N, C, H, W)), as
    timm's SelectiveKernel after its convs: the weights attn = softmax over the paths of
    fc_select(act(BN(fc_reduce(mean_hw(sum of the paths))))), and the sum of the paths weighted
    by them. fc_reduce_weight is (A, C, 1, 1), fc_select_weight (P*C, A, 1, 1) (or the linear
    (A, C), (P*C, A)); the BN arguments are those of F.batch_norm, its running statistics updated
    in training; bn_group as cbam()'s."""
    choice, act_name = _selective_kernel_plan(paths, fc_reduce_weight, fc_select_weight, bn_running_mean,
                                              bn_running_var, bn_weight, bn_bias, bn_training, bn_group, act)
    if choice.backend == "reference":
        return reference.selective_kernel(
            paths, fc_reduce_weight, fc_select_weight, bn_running_mean, bn_running_var, bn_weight, bn_bias,
            bn_training=bn_training, bn_momentum=bn_momentum, bn_eps=bn_eps, bn_group=bn_group, act=act,
        )
    y, _, bn_mean, bn_var, bn_count = selective_kernel_forward(
        list(paths), fc_reduce_weight, bn_weight, bn_bias, bn_running_mean, bn_running_var, bn_training, bn_eps,
        bn_group, fc_select_weight, act_name,
    )
    if bn_training:
        batch_norm.update_running_stats(bn_running_mean, bn_running_var, bn_mean, bn_var, bn_count, bn_momentum)
    return y


def _sigmoid_gate_plan(x, logits) -> Dispatch:
    _check_activation_input(x)
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    N, C, H, W = x.shape
    if tuple(logits.shape) not in ((N, C, H, W), (N, 1, H, W)):
        raise ValueError(f"logits must have x's shape {(N, C, H, W)} or {(N, 1, H, W)}, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.device != x.device:
        raise ValueError(f"logits is on {logits.device} but x is on {x.device}; they must be on the same device")
    spatial = is_spatial(x, logits)
    reason = None
    if logits.dtype != x.dtype:
        reason = f"logits has dtype {logits.dtype} and x {x.dtype}; the kernels take one dtype"
    elif not spatial and logits.numel() and logits.stride() != x.stride():
        reason = f"logits (strides {logits.stride()}) is not in x's memory layout (strides {x.stride()})"
    return dispatch(x, reason, KERNEL_BACKENDS if spatial else TRITON_ONLY)


def sigmoid_gate_dispatch(x: Tensor, logits: Tensor) -> Dispatch:
    """Which backend sigmoid_gate() runs on (x, logits), and why others were passed over."""
    return _sigmoid_gate_plan(x, logits)


def sigmoid_gate(x: Tensor, logits: Tensor, *, residual: bool = False) -> Tensor:
    """y = x * (residual + sigmoid(logits)), the sigmoid and the product fused.

    logits of x's shape: YOLOv4's point-wise SAM (residual=False) or Residual Attention's
    (1 + M) * T with T = x and M = sigmoid(logits) (residual=True). logits (N, 1, H, W): one gate
    per pixel, the spatial SAM."""
    choice = _sigmoid_gate_plan(x, logits)
    if choice.backend == "reference":
        return reference.sigmoid_gate(x, logits, residual=residual)
    return sigmoid_gate_forward(x, logits, bool(residual), choice.backend)


def sam(x: Tensor, logits: Tensor) -> Tensor:
    """YOLOv4's spatial attention module after its conv: x * sigmoid(logits)."""
    return sigmoid_gate(x, logits)


def residual_attention(trunk: Tensor, mask_logits: Tensor) -> Tensor:
    """Residual Attention Network's (1 + M) * T, M = sigmoid(mask_logits): the mask branch's last
    sigmoid fused with the combination."""
    return sigmoid_gate(trunk, mask_logits, residual=True)


def non_local_dispatch(x: Tensor) -> Dispatch:
    """How non_local() computes on x: 'sdpa' (torch's scaled_dot_product_attention, which picks
    a flash or memory-efficient kernel where it can) unless the reference backend is selected."""
    if get_backend() == "reference":
        return Dispatch("reference", {})
    return Dispatch("sdpa", {})


def non_local(
    x: Tensor,
    theta_weight: Tensor,
    theta_bias: Optional[Tensor],
    phi_weight: Tensor,
    phi_bias: Optional[Tensor],
    g_weight: Tensor,
    g_bias: Optional[Tensor],
    *,
    scale: float,
    sub_sample: bool = False,
) -> Tensor:
    """The non-local operation (embedded Gaussian) of timm's NonLocalAttn and mmcv's NonLocal2d,
    before their output conv: softmax(scale * theta(x)^T phi(x)) applied to g(x), (N, R, H, W).

    theta, phi and g are 1x1 convs (R, C, 1, 1) run as one conv (x read once); the attention runs
    through scaled_dot_product_attention, which never stores the (H*W) x (H*W) matrix on GPUs
    (flash or memory-efficient kernels). sub_sample max-pools phi(x) and g(x) 2x2 (mmcv)."""
    _check_activation_input(x)
    C = x.shape[1]
    if not isinstance(theta_weight, Tensor) or theta_weight.dim() != 4 or theta_weight.shape[1:] != (C, 1, 1):
        raise ValueError(f"theta_weight must be an (R, {C}, 1, 1) tensor, got {_shape_of(theta_weight)}")
    R = theta_weight.shape[0]
    for name, t in (("phi_weight", phi_weight), ("g_weight", g_weight)):
        _check_tensor(name, t, (R, C, 1, 1), x)
    for name, t in (("theta_bias", theta_bias), ("phi_bias", phi_bias), ("g_bias", g_bias)):
        _check_tensor(name, t, (R,), x, optional=True)
    if non_local_dispatch(x).backend == "reference":
        return reference.non_local(x, theta_weight, theta_bias, phi_weight, phi_bias, g_weight, g_bias, scale=scale,
                                   sub_sample=sub_sample)
    B, _, H, W = x.shape
    weight = torch.cat([theta_weight, phi_weight, g_weight])
    biases = (theta_bias, phi_bias, g_bias)
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else weight.new_zeros(R) for b in biases])
    qkv = torch.nn.functional.conv2d(x, weight, bias)
    # Tokens (B, H*W, 3R) with unit stride along R, as flash and memory-efficient attention need
    # (otherwise SDPA falls back to its math path, which stores the matrix): a view of a
    # channels_last qkv, a copy of 3R/C of |x| for an NCHW one.
    tokens = qkv.flatten(2).transpose(1, 2).contiguous()
    q, kv = tokens[..., :R], tokens[..., R:]
    if sub_sample:  # 2x2 max pooling of phi(x) and g(x), on a channels_last view of their tokens
        pooled = torch.nn.functional.max_pool2d(kv.unflatten(1, (H, W)).permute(0, 3, 1, 2), 2)
        kv = pooled.permute(0, 2, 3, 1).flatten(1, 2)
    y = torch.nn.functional.scaled_dot_product_attention(q[:, None], kv[:, None, :, :R], kv[:, None, :, R:], scale=scale)
    y = y[:, 0].unflatten(1, (H, W)).permute(0, 3, 1, 2)  # (B, R, H, W), channels_last
    return y.contiguous(memory_format=torch.channels_last if not x.is_contiguous() else torch.contiguous_format)


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 1:
        raise ValueError(f"p must be a number >= 1 (|x|^p has no derivative at 0 below 1), got {p!r}")


def at_map_dispatch(x: Tensor) -> Dispatch:
    """Which backend at_map() and at_loss() run on x, and why others were passed over."""
    _check_activation_input(x)
    return dispatch(x, None, TRITON_ONLY)


def _at_map(x: Tensor, p: float) -> Tensor:
    """The normalized map in the accumulator dtype (float32, float64 for float64 x)."""
    if at_map_dispatch(x).backend == "reference":
        return reference.at_map(x.to(acc_dtype(x.dtype)), p)
    return torch.nn.functional.normalize(channel_power_mean(x, float(p)), dim=1)


def at_map(x: Tensor, p: float = 2) -> Tensor:
    """Attention transfer's map of an activation x (N, C, H, W): the mean over channels of |x|^p,
    flattened to (N, H*W) and L2-normalized per sample, in x's dtype. One read of x forward, one
    read of x and a write of its gradient backward."""
    _check_p(p)
    _check_activation_input(x)
    return _at_map(x, p).to(x.dtype)


def at_loss(student: Tensor, teacher: Tensor, p: float = 2) -> Tensor:
    """The attention-transfer loss, mean((at_map(student) - at_map(teacher))^2), as the paper's
    code; the teacher is detached (the gradient goes to the student only). Where H or W differ,
    the larger activation is adaptive-average-pooled to the smaller size first. The maps and the
    loss are computed in float32; the loss comes in the student's dtype."""
    _check_p(p)
    _check_activation_input(student)
    _check_activation_input(teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher must have the same batch size, got {student.shape[0]} and {teacher.shape[0]}")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} but teacher is on {teacher.device}")
    student, teacher = reference.aligned(student, teacher.detach())
    return (_at_map(student, p) - _at_map(teacher, p)).pow(2).mean().to(student.dtype)


def _int_pair(name: str, value, minimum: int) -> tuple:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                                 for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair


def _check_deform_tensor(name: str, t, shape: tuple, input: Tensor, optional: bool = False):
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != input.dtype:
        raise TypeError(f"{name} must have input's dtype {input.dtype}, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}; they must be on the same device")


def _deform_conv2d_plan(input, offset, weight, bias, stride, padding, dilation, mask):
    """(dispatch, stride, padding, dilation) for deform_conv2d(), after torchvision's argument checks
    (each naming its argument)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    stride, padding, dilation = (_int_pair("stride", stride, 1), _int_pair("padding", padding, 0),
                                 _int_pair("dilation", dilation, 1))
    N, C, H, W = input.shape
    if not isinstance(weight, Tensor) or weight.dim() != 4 or min(weight.shape, default=0) < 1:
        raise ValueError(f"weight must be a non-empty 4-D tensor (out_channels, in_channels // groups, kh, kw), "
                         f"got {_shape_of(weight)}")
    O, Cg, kh, kw = weight.shape
    if C < Cg or C % Cg or O % (C // Cg):
        raise ValueError(f"weight must have a divisor of input's {C} channels as shape[1] (in_channels // groups), "
                         f"and out_channels divisible by the groups; got {tuple(weight.shape)}")
    _check_deform_tensor("weight", weight, tuple(weight.shape), input)
    Hout = (H + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    Wout = (W + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    if Hout < 1 or Wout < 1:
        raise ValueError(f"input of spatial size {(H, W)} is too small for a {kh}x{kw} kernel with padding {padding} "
                         f"and dilation {dilation}: the output would be {Hout}x{Wout}")
    if not isinstance(offset, Tensor):
        raise TypeError(f"offset must be a tensor, got {type(offset).__name__}")
    if offset.dim() != 4:
        raise ValueError(f"offset must be 4-D (N, 2 * offset_groups * kh * kw, Hout, Wout), got shape {tuple(offset.shape)}")
    D = offset.shape[1] // (2 * kh * kw)
    if D < 1 or offset.shape[1] != 2 * D * kh * kw or C % D:
        raise ValueError(f"offset.shape[1] must be 2 * offset_groups * kh * kw = {2 * kh * kw} * offset_groups with "
                         f"offset_groups dividing input's {C} channels, got {offset.shape[1]}")
    _check_deform_tensor("offset", offset, (N, 2 * D * kh * kw, Hout, Wout), input)
    _check_deform_tensor("mask", mask, (N, D * kh * kw, Hout, Wout), input, optional=True)
    _check_deform_tensor("bias", bias, (O,), input, optional=True)
    return dispatch(input, None, TRITON_ONLY), stride, padding, dilation


def deform_conv2d_dispatch(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                           padding=0, dilation=1, mask: Optional[Tensor] = None) -> Dispatch:
    """Which backend deform_conv2d() runs on these arguments, and why others were passed over."""
    return _deform_conv2d_plan(input, offset, weight, bias, stride, padding, dilation, mask)[0]


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                  dilation=1, mask: Optional[Tensor] = None) -> Tensor:
    """torchvision.ops.deform_conv2d (modulated deformable convolution, DCNv2; DCNv1 without mask),
    its arguments and results, as implicit GEMMs that sample the input on chip: no im2col buffer
    (attn_kernels/ops/deform_conv.py). groups come from weight.shape[1], offset groups from
    offset.shape[1] // (2 * kh * kw)."""
    if isinstance(input, Tensor) and torch.is_autocast_enabled(input.device.type):
        # As nn.Conv2d under autocast: every tensor in the autocast dtype, the GEMMs on tensor cores.
        # (torchvision's op runs in float32 under autocast and returns input's dtype.)
        dtype = torch.get_autocast_dtype(input.device.type)
        input, offset, weight, bias, mask = (t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                                             for t in (input, offset, weight, bias, mask))
    choice, stride, padding, dilation = _deform_conv2d_plan(input, offset, weight, bias, stride, padding, dilation,
                                                            mask)
    if choice.backend == "reference":
        return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)
    return deform_conv2d_forward(input, weight, offset, mask, bias, list(stride), list(padding), list(dilation))
