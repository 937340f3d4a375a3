"""Fusing the attention modules of an existing model in place: patch(model), unpatch(model).

    model = timm.create_model("seresnet50")
    attn_kernels.patch(model, verbose=True)   # prints what was patched, and what was left alone and why
    ...                                        # train, save, compile as before
    attn_kernels.unpatch(model)

How: a supported module keeps its identity, parameters, buffers, hooks and state_dict (keys and
order); only its class changes, to a subclass of both the fused drop-in of attn_kernels.nn (whose
forward and dispatch run) and its own class (so isinstance checks still hold). unpatch sets the
original class back. Nothing is copied or re-registered: optimizers, EMA copies and anything else
holding the parameters stay valid. A patched model pickles (torch.save) and deep-copies as patched.
torch.fx records a patched module as one call, torch.export as the fused op, and TorchScript
compiles its original class's forward (attn_kernels.nn.FusedModule says why). Patch before tracing:
torch.fx inlines an unpatched module into its graph, where patch() cannot reach it.

Recognized, by class (that class, or a subclass that keeps its forward):
    timm SEModule, EffectiveSEModule, SqueezeExcite (EfficientNet, MobileNet), EcaModule,
    CecaModule, CbamModule, LightCbamModule and their ChannelAttn / SpatialAttn halves, GlobalContext,
    SelectiveKernel, SelectiveKernelAttn, NonLocalAttn; torchvision.ops.SqueezeExcitation;
    segmentation_models_pytorch's SCSEModule (the decoder attention of its U-Net and friends).
By class name and structure, as users copy the code into their own modules (the structure, i.e.
the submodules, their types, shapes and options, must be the original's; the forward is trusted):
    CBAM, ChannelGate, SpatialGate (the CBAM paper's Jongchan/attention-module), eca_layer (the
    ECA-Net paper's BangguWu/ECANet), ContextBlock (mmcv.cnn, GCNet's block), NonLocal2d (mmcv.cnn,
    'embedded_gaussian' mode), SCSEModule (segmentation_models_pytorch's, copied).
A recognized module whose configuration has no fused formula (say, a GELU(approximate='tanh')
activation, or a norm layer inside SE) is left alone, with the reason in the report: patched, it
would only run the reference.
"""
import warnings
from types import FunctionType
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple

from torch import fx, nn

from . import nn as fused_nn
from .nn import cbam as fused_cbam
from .activations import kernel_activation_name
from .functional import _no_formula
from .ops.primitives import MAX_PATHS

__all__ = ["PatchEntry", "PatchReport", "patch", "patch_report", "unpatch"]


def _full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _activation_reason(activations: Dict[str, nn.Module]) -> Optional[str]:
    """Why these activations (attribute name -> module) keep a block off the kernels, or None."""
    for attribute, act in activations.items():
        if kernel_activation_name(act) is None:
            return _no_formula(attribute, act)
    return None


# --- checks of the modules recognized by class: None when the fused kernels can compute them ---

def _se_reason(m) -> Optional[str]:
    if not isinstance(m.bn, nn.Identity):
        return f"norm layer {type(m.bn).__name__} between fc1 and act has no fused kernel"
    return _activation_reason({"act": m.act, "gate": m.gate})


def _eca_reason(m) -> Optional[str]:
    activations = {"act": m.act, "gate": m.gate} if m.conv2 is not None else {"gate": m.gate}
    return _activation_reason(activations)


def _gc_reason(m) -> Optional[str]:
    mlps = [mlp for mlp in (m.mlp_scale, m.mlp_add) if mlp is not None]
    if not mlps:
        return "neither fuse_scale nor fuse_add: the block returns x, there is nothing to fuse"
    if len(mlps) == 2 and type(mlps[0].act) is not type(mlps[1].act):
        return "mlp_scale and mlp_add have different activations; the fused op applies one to both"
    if m.mlp_scale is not None:
        return _activation_reason({"act": mlps[0].act, "gate": m.gate})
    return _activation_reason({"act": mlps[0].act})


def _selective_kernel_reason(m) -> Optional[str]:
    if m.num_paths > MAX_PATHS:
        return f"{m.num_paths} paths; the fused kernels take at most {MAX_PATHS}"
    if type(m.attn.bn) is not nn.BatchNorm2d or not m.attn.bn.affine:
        return f"attn.bn {type(m.attn.bn).__name__} is not an affine BatchNorm2d"
    return _activation_reason({"attn.act": m.attn.act})


def _scse_mismatch(m) -> Optional[str]:
    """segmentation_models_pytorch's SCSEModule: cSE = Sequential(AdaptiveAvgPool2d(1), Conv2d(C, R, 1),
    ReLU, Conv2d(R, C, 1), Sigmoid), sSE = Sequential(Conv2d(C, 1, 1), Sigmoid)."""
    cse, sse = getattr(m, "cSE", None), getattr(m, "sSE", None)
    fc1 = cse[1] if isinstance(cse, nn.Sequential) and len(cse) == 5 else None
    channels, hidden = (fc1.in_channels, fc1.out_channels) if isinstance(fc1, nn.Conv2d) else (None, None)
    if not (fc1 is not None and type(cse[0]) is nn.AdaptiveAvgPool2d and cse[0].output_size in (1, (1, 1))
            and _is_conv(fc1, nn.Conv2d, channels, hidden, (1, 1), (0, 0), None) and type(cse[2]) is nn.ReLU
            and _is_conv(cse[3], nn.Conv2d, hidden, channels, (1, 1), (0, 0), None) and type(cse[4]) is nn.Sigmoid):
        return "cSE is not Sequential(AdaptiveAvgPool2d(1), Conv2d(C, R, 1), ReLU, Conv2d(R, C, 1), Sigmoid)"
    if not (isinstance(sse, nn.Sequential) and len(sse) == 2
            and _is_conv(sse[0], nn.Conv2d, channels, 1, (1, 1), (0, 0), None) and type(sse[1]) is nn.Sigmoid):
        return f"sSE is not Sequential(Conv2d({channels}, 1, 1), Sigmoid)"
    return None


class _Rule(NamedTuple):
    fused: type                                      # the drop-in whose forward a patched module runs
    reason: Callable[[nn.Module], Optional[str]]     # why this instance cannot be fused, or None


_BY_CLASS: Dict[str, _Rule] = {
    "timm.layers.squeeze_excite.SEModule": _Rule(fused_nn.FusedSE, _se_reason),
    "timm.layers.squeeze_excite.EffectiveSEModule": _Rule(
        fused_nn.FusedEffectiveSE, lambda m: _activation_reason({"gate": m.gate})),
    "timm.models._efficientnet_blocks.SqueezeExcite": _Rule(
        fused_nn.FusedSqueezeExcite, lambda m: _activation_reason({"act1": m.act1, "gate": m.gate})),
    "timm.layers.eca.EcaModule": _Rule(fused_nn.FusedECA, _eca_reason),
    "timm.layers.eca.CecaModule": _Rule(fused_nn.FusedCECA, lambda m: _activation_reason({"gate": m.gate})),
    "timm.layers.cbam.ChannelAttn": _Rule(
        fused_nn.FusedChannelAttn, lambda m: _activation_reason({"act": m.act, "gate": m.gate})),
    "timm.layers.cbam.SpatialAttn": _Rule(fused_nn.FusedSpatialAttn, lambda m: _activation_reason({"gate": m.gate})),
    "timm.layers.cbam.CbamModule": _Rule(fused_nn.FusedCBAM, lambda m: _activation_reason(
        {"channel.act": m.channel.act, "channel.gate": m.channel.gate, "spatial.gate": m.spatial.gate})),
    "timm.layers.cbam.LightChannelAttn": _Rule(
        fused_nn.FusedLightChannelAttn, lambda m: _activation_reason({"act": m.act})),
    "timm.layers.cbam.LightSpatialAttn": _Rule(
        fused_nn.FusedLightSpatialAttn, lambda m: _activation_reason({"gate": m.gate})),
    "timm.layers.cbam.LightCbamModule": _Rule(fused_nn.FusedLightCBAM, lambda m: _activation_reason(
        {"channel.act": m.channel.act, "spatial.gate": m.spatial.gate})),
    "timm.layers.global_context.GlobalContext": _Rule(fused_nn.FusedGC, _gc_reason),
    "timm.layers.selective_kernel.SelectiveKernel": _Rule(fused_nn.FusedSelectiveKernel, _selective_kernel_reason),
    "timm.layers.selective_kernel.SelectiveKernelAttn": _Rule(fused_nn.FusedSelectiveKernelAttn, lambda m: None),
    "timm.layers.non_local_attn.NonLocalAttn": _Rule(fused_nn.FusedNonLocalAttn, lambda m: None),
    "segmentation_models_pytorch.base.modules.SCSEModule": _Rule(fused_nn.FusedSCSE, _scse_mismatch),
    "torchvision.ops.misc.SqueezeExcitation": _Rule(
        fused_nn.FusedSqueezeExcitation,
        lambda m: _activation_reason({"activation": m.activation, "scale_activation": m.scale_activation})),
}


# --- checks of the modules recognized by name and structure: None when the structure is the original's ---

def _is_conv(m, conv_type, in_channels, out_channels, kernel_size, padding, bias: Optional[bool]) -> bool:
    """m is a conv_type with these shapes, stride 1, dilation 1, one group (bias None: either)."""
    return (type(m) is conv_type and m.in_channels == in_channels and m.out_channels == out_channels
            and m.kernel_size == kernel_size and m.padding == padding and set(m.stride) == {1}
            and set(m.dilation) == {1} and m.groups == 1 and m.padding_mode == "zeros"
            and (bias is None or (m.bias is not None) == bias))


def _channel_gate_mismatch(m) -> Optional[str]:
    mlp = getattr(m, "mlp", None)
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 4 and type(mlp[1]) is nn.Linear
            and type(mlp[2]) is nn.ReLU and type(mlp[3]) is nn.Linear
            and mlp[3].in_features == mlp[1].out_features and mlp[3].out_features == mlp[1].in_features):
        return "mlp is not Sequential(Flatten, Linear(C, R), ReLU, Linear(R, C))"
    pool_types = getattr(m, "pool_types", None)
    if not isinstance(pool_types, (list, tuple)) or not pool_types or not set(pool_types) <= {"avg", "max"}:
        return f"pool_types {pool_types!r}: the fused kernels pool 'avg' and 'max' only"
    if len(pool_types) != len(set(pool_types)):
        return f"pool_types {pool_types!r} repeats a pool"
    return None


def _spatial_gate_mismatch(m) -> Optional[str]:
    basic = getattr(m, "spatial", None)
    conv, bn = getattr(basic, "conv", None), getattr(basic, "bn", None)
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else 0
    if not (k % 2 == 1 and _is_conv(conv, nn.Conv2d, 2, 1, (k, k), (k // 2, k // 2), bias=False)):
        return "spatial.conv is not Conv2d(2, 1, k, padding=k // 2, bias=False) with odd k"
    if not (type(bn) is nn.BatchNorm2d and bn.num_features == 1 and bn.affine):
        return "spatial.bn is not an affine BatchNorm2d(1)"
    if getattr(basic, "relu", None) is not None:
        return "spatial.relu is set: the official SpatialGate has relu=False"
    return None


def _cbam_mismatch(m) -> Optional[str]:
    channel = getattr(m, "ChannelGate", None)
    if type(channel).__name__ != "ChannelGate":
        return "no ChannelGate submodule"
    if getattr(m, "no_spatial", None) not in (True, False):
        return "no no_spatial flag"
    why = _channel_gate_mismatch(channel)
    if why is None and not m.no_spatial:
        spatial = getattr(m, "SpatialGate", None)
        why = "no SpatialGate submodule" if type(spatial).__name__ != "SpatialGate" else _spatial_gate_mismatch(spatial)
    return f"ChannelGate/SpatialGate: {why}" if why else None


def _eca_layer_mismatch(m) -> Optional[str]:
    conv = getattr(m, "conv", None)
    k = conv.kernel_size[0] if isinstance(conv, nn.Conv1d) else 0
    if not (k % 2 == 1 and _is_conv(conv, nn.Conv1d, 1, 1, (k,), ((k - 1) // 2,), bias=False)):
        return "conv is not Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False) with odd k"
    if type(getattr(m, "sigmoid", None)) is not nn.Sigmoid:
        return "sigmoid is not nn.Sigmoid"
    return None


def _context_block_mismatch(m) -> Optional[str]:
    pooling, fusion = getattr(m, "pooling_type", None), getattr(m, "fusion_types", None)
    if pooling not in ("att", "avg"):
        return f"pooling_type {pooling!r} is neither 'att' nor 'avg'"
    if not isinstance(fusion, (list, tuple)) or not fusion or not set(fusion) <= {"channel_add", "channel_mul"}:
        return f"fusion_types {fusion!r} is not a non-empty list of 'channel_add' and/or 'channel_mul'"
    channels, planes = getattr(m, "in_channels", None), getattr(m, "planes", None)
    if pooling == "att" and not _is_conv(getattr(m, "conv_mask", None), nn.Conv2d, channels, 1, (1, 1), (0, 0), None):
        return f"conv_mask is not Conv2d({channels}, 1, 1)"
    for kind, attribute in (("channel_add", "channel_add_conv"), ("channel_mul", "channel_mul_conv")):
        seq = getattr(m, attribute, None)
        if kind not in fusion:
            if seq is not None:
                return f"{attribute} is set but fusion_types lacks {kind!r}"
            continue
        if not (isinstance(seq, nn.Sequential) and len(seq) == 4
                and _is_conv(seq[0], nn.Conv2d, channels, planes, (1, 1), (0, 0), True)
                and type(seq[1]) is nn.LayerNorm and tuple(seq[1].normalized_shape) == (planes, 1, 1)
                and seq[1].elementwise_affine and seq[1].bias is not None and type(seq[2]) is nn.ReLU
                and _is_conv(seq[3], nn.Conv2d, planes, channels, (1, 1), (0, 0), True)):
            return f"{attribute} is not Sequential(Conv2d(C, planes, 1), LayerNorm([planes, 1, 1]), ReLU, Conv2d(planes, C, 1))"
    return None


def _non_local_mismatch(m) -> Optional[str]:
    if getattr(m, "mode", None) != "embedded_gaussian":
        return f"mode {getattr(m, 'mode', None)!r}: only 'embedded_gaussian' has a fused path"
    channels, inter = getattr(m, "in_channels", None), getattr(m, "inter_channels", None)
    sub_sample = getattr(m, "sub_sample", None)
    if sub_sample not in (True, False) or getattr(m, "use_scale", None) not in (True, False):
        return "no sub_sample or use_scale flag"
    for attribute in ("theta", "phi", "g"):
        module = getattr(m, attribute, None)
        if sub_sample and attribute != "theta":
            if not (isinstance(module, nn.Sequential) and len(module) == 2 and type(module[1]) is nn.MaxPool2d
                    and module[1].kernel_size in (2, (2, 2)) and module[1].stride in (2, (2, 2))):
                return f"{attribute} is not Sequential(ConvModule, MaxPool2d(2)) with sub_sample"
            module = module[0]
        if getattr(module, "norm_name", None) or getattr(module, "with_activation", False) \
                or not _is_conv(getattr(module, "conv", None), nn.Conv2d, channels, inter, (1, 1), (0, 0), True):
            return f"{attribute} is not a ConvModule with Conv2d({channels}, {inter}, 1) alone"
    return None


class _StructuralRule(NamedTuple):
    fused: type
    mismatch: Callable[[nn.Module], Optional[str]]   # how the structure differs from the original's, or None
    origin: str                                      # where the original code lives, for the report


_BY_NAME: Dict[str, _StructuralRule] = {
    "CBAM": _StructuralRule(fused_nn.FusedCBAMOfficial, _cbam_mismatch, "the CBAM paper's code"),
    "ChannelGate": _StructuralRule(fused_cbam._OfficialChannelGate, _channel_gate_mismatch, "the CBAM paper's code"),
    "SpatialGate": _StructuralRule(fused_cbam._OfficialSpatialGate, _spatial_gate_mismatch, "the CBAM paper's code"),
    "eca_layer": _StructuralRule(fused_nn.FusedECAOfficial, _eca_layer_mismatch, "the ECA-Net paper's code"),
    "ContextBlock": _StructuralRule(fused_nn.FusedContextBlock, _context_block_mismatch, "mmcv"),
    "NonLocal2d": _StructuralRule(fused_nn.FusedNonLocal2d, _non_local_mismatch, "mmcv"),
    "SCSEModule": _StructuralRule(fused_nn.FusedSCSE, _scse_mismatch, "segmentation_models_pytorch"),
}

# Attention modules of the libraries above with no fused version here: listed so the report says so.
_NOT_FUSED = {
    "timm": {"GatherExcite", "SplitAttn", "LambdaLayer", "BottleneckAttn", "HaloAttn", "BatNonLocalAttn",
             "SqueezeExciteCl", "CoordAttn"},
    "mmcv": {"GeneralizedAttention"},
}


# --- patched classes ---

class _Patched:
    """Base of every patched class: pickles as (original class, fused class, state)."""

    _attn_kernels_original: type
    _attn_kernels_fused: type

    def __reduce_ex__(self, protocol):
        state = super().__reduce_ex__(protocol)[2:]
        return (_new_patched, (self._attn_kernels_original, self._attn_kernels_fused), *state)


_PATCHED_CLASSES: Dict[Tuple[type, type], type] = {}


def _as_method(function: FunctionType, name: str) -> FunctionType:
    """`function` under another name. TorchScript compiles a method under its function's name, and
    the original forward becomes the patched class's reference_forward (attn_kernels.nn.FusedModule)."""
    renamed = FunctionType(function.__code__, function.__globals__, name, function.__defaults__, function.__closure__)
    renamed.__module__, renamed.__qualname__ = function.__module__, function.__qualname__
    renamed.__annotations__ = dict(function.__annotations__)
    return renamed


def _patched_class(original: type, fused: type) -> type:
    """The class of a patched `original`: the fused forward first, then the original class. Its
    reference_forward, what TorchScript compiles, is the original class's own forward."""
    key = (original, fused)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(
            f"Fused{original.__name__}", (_Patched, fused, original),
            {"__module__": __name__, "_attn_kernels_original": original, "_attn_kernels_fused": fused,
             "reference_forward": _as_method(original.forward, "reference_forward")},
        )
    return _PATCHED_CLASSES[key]


def _new_patched(original: type, fused: type):
    """An empty patched module, for unpickling (its state is set after)."""
    cls = _patched_class(original, fused)
    return cls.__new__(cls)


# --- examining and patching ---

class PatchEntry(NamedTuple):
    name: str      # the module's name in the model ('' for the model itself)
    original: str  # its original class, module path included
    status: str    # 'patched', 'patchable' (patch() would patch it) or 'left alone'
    detail: str    # the fused forward it runs (patched, patchable), or why it is left alone


class PatchReport(NamedTuple):
    """The attention modules of a model, as patch() sees them; print it for a table."""

    entries: Tuple[PatchEntry, ...]

    def with_status(self, status: str) -> Tuple[PatchEntry, ...]:
        return tuple(e for e in self.entries if e.status == status)

    def __str__(self) -> str:
        if not self.entries:
            return "attn_kernels.patch: no attention module found"
        counts = ", ".join(f"{len(self.with_status(s))} {s}" for s in ("patched", "patchable", "left alone")
                           if self.with_status(s))
        width = max(len(e.name or "(model)") for e in self.entries)
        lines = [f"attn_kernels.patch: {counts}"]
        for e in self.entries:
            lines.append(f"  {e.name or '(model)':<{width}}  {e.status:<10}  {e.original.rsplit('.', 1)[-1]}: {e.detail}")
        return "\n".join(lines)


class _Verdict(NamedTuple):
    status: str
    detail: str
    fused: Optional[type] = None


def _rule_for(cls: type) -> Tuple[Optional[_Rule], Optional[str]]:
    """(rule, None) for a supported class or a subclass keeping its forward; (None, why) for a
    subclass with its own forward; (None, None) otherwise."""
    for base in cls.__mro__:
        rule = _BY_CLASS.get(_full_name(base))
        if rule is not None:
            if base is cls or cls.forward is base.forward:
                return rule, None
            return None, f"a subclass of {_full_name(base)} with its own forward"
    return None, None


def _examine(m: nn.Module) -> Optional[_Verdict]:
    """What patch() does with m; None for a module that is not attention."""
    cls = type(m)
    if isinstance(m, _Patched):
        return _Verdict("patched", f"runs {m._attn_kernels_fused.__name__}.forward")
    rule, why = _rule_for(cls)
    if rule is not None:
        why = rule.reason(m)
        return _Verdict("left alone", why) if why else _Verdict("patchable", f"{rule.fused.__name__}.forward", rule.fused)
    if why is not None:
        return _Verdict("left alone", why)
    structural = _BY_NAME.get(cls.__name__)
    if structural is not None:
        why = structural.mismatch(m)
        if why:
            return _Verdict("left alone", f"named as in {structural.origin} but {why}")
        return _Verdict("patchable", f"{structural.fused.__name__}.forward", structural.fused)
    library = cls.__module__.split(".")[0]
    if cls.__name__ in _NOT_FUSED.get(library, ()):
        return _Verdict("left alone", "attn_kernels has no fused version of this module")
    return None


def _walk(module: nn.Module, name: str = "") -> Iterator[Tuple[str, nn.Module, _Verdict]]:
    """The attention modules under `module`, outermost first. The children of a patched or
    patchable module are skipped: its fused forward does not call them."""
    verdict = _examine(module)
    if verdict is not None:
        yield name, module, verdict
        if verdict.status != "left alone":
            return
    for child_name, child in module.named_children():
        yield from _walk(child, f"{name}.{child_name}" if name else child_name)


_TRACED_THROUGH = ("traced through by torch.fx: its operations are inlined in the GraphModule's graph, "
                   "out of patch()'s reach (patch the model before tracing it)")


def _traced_through(model: fx.GraphModule) -> Iterator[PatchEntry]:
    """The attention modules torch.fx traced through when it built `model`: the graph keeps their
    names and classes in each node's nn_module_stack, but no module to patch. A module the graph
    calls (a call_module node: a leaf, or a fused module) is not traced through."""
    called = {node.target for node in model.graph.nodes if node.op == "call_module"}
    seen = {}
    for node in model.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if path not in called and isinstance(cls, type):
                seen.setdefault(path, cls)
    for path, cls in seen.items():
        if _rule_for(cls) != (None, None) or cls.__name__ in _BY_NAME:
            yield PatchEntry(path, _full_name(cls), "left alone", _TRACED_THROUGH)


def _synchronized(m: nn.Module) -> str:
    """Says which BatchNorms of a fused module are nn.SyncBatchNorm (attn_kernels.batch_norm)."""
    names = [name for name, child in m.named_modules() if isinstance(child, nn.SyncBatchNorm)]
    if not names:
        return ""
    return f"; synchronized BatchNorm ({', '.join(names)}): in training, the statistics of its process group"


def patch_report(model: nn.Module) -> PatchReport:
    """Every attention module of `model`: patched, patchable, or left alone (and why). For a
    torch.fx.GraphModule, also those that tracing inlined into its graph."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    entries = [PatchEntry(name, _full_name(getattr(m, "_attn_kernels_original", type(m))), v.status,
                          v.detail + _synchronized(m) if v.status != "left alone" else v.detail)
               for name, m, v in _walk(model)]
    if isinstance(model, fx.GraphModule):
        entries += _traced_through(model)
    return PatchReport(tuple(entries))


def patch(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Fuse, in place, every supported attention module of `model` (see this module's docstring)
    and return the model. verbose=True prints patch_report(model) afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = list(_walk(model))
    for _, m, verdict in found:
        if verdict.status == "patchable":
            m.__class__ = _patched_class(type(m), verdict.fused)
    if verbose:
        print(patch_report(model))
    if isinstance(model, fx.GraphModule):
        inlined = list(_traced_through(model))
        if inlined:
            patched = sum(verdict.status != "left alone" for _, _, verdict in found)  # patched now, or before
            warnings.warn(f"attn_kernels.patch: {len(inlined)} attention modules of this GraphModule were {_TRACED_THROUGH} "
                          f"({', '.join(e.name for e in inlined[:3])}{', ...' if len(inlined) > 3 else ''}); "
                          f"{patched} of its modules are patched", stacklevel=2)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Give every patched module of `model` its original class back; return the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if isinstance(m, _Patched):
            m.__class__ = m._attn_kernels_original
    return model
