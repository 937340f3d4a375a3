"""Pure PyTorch references: exactly what the modules the kernels replace compute, op for op.

These are the truth in every test and the 'reference' backend. Each has the signature of the
fused function in attn_kernels.functional.
"""
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .batch_norm import batch_norm

Act = Union[str, Callable[[torch.Tensor], torch.Tensor]]


def _as_callable(act: Act) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[act].forward if isinstance(act, str) else act


def se(
    x: torch.Tensor,
    fc1_weight: Optional[torch.Tensor],
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    add_maxpool: bool = False,
    act: Act = "relu",
    gate: Act = "sigmoid",
    norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """timm.layers.SEModule.forward: x * gate(fc2(act(norm(fc1(pool(x)))))); without fc1_weight,
    timm.layers.EffectiveSEModule.forward: x * gate(fc2(pool(x)))."""
    x_se = x.mean((2, 3), keepdim=True)
    if add_maxpool:
        x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
    if fc1_weight is not None:
        x_se = F.conv2d(x_se, fc1_weight, fc1_bias)
        if norm is not None:
            x_se = norm(x_se)
        x_se = _as_callable(act)(x_se)
    x_se = F.conv2d(x_se, fc2_weight, fc2_bias)
    return x * _as_callable(gate)(x_se)


def _conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1-conv weight as is, a linear (out, in) weight as the equivalent 1x1-conv weight."""
    return weight if weight.dim() == 4 else weight[:, :, None, None]


def channel_attn(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    pool: str = "avg+max",
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> torch.Tensor:
    """timm.layers.cbam.ChannelAttn.forward: x * gate(mlp(mean_hw(x)) + mlp(max_hw(x))); pool
    'avg' or 'max' keeps one branch (the official CBAM code's pool_types); 'mix' is
    timm.layers.cbam.LightChannelAttn.forward: x * gate(mlp(0.5 * mean_hw(x) + 0.5 * max_hw(x)))."""
    act_fn = _as_callable(act)

    def mlp(p):
        hidden = act_fn(F.conv2d(p, _conv_weight(fc1_weight), fc1_bias))
        return F.conv2d(hidden, _conv_weight(fc2_weight), fc2_bias)

    if pool == "mix":
        x_pool = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return x * _as_callable(gate)(mlp(x_pool))
    branches = []
    if pool in ("avg", "avg+max"):
        branches.append(mlp(x.mean((2, 3), keepdim=True)))
    if pool in ("max", "avg+max"):
        branches.append(mlp(x.amax((2, 3), keepdim=True)))
    return x * _as_callable(gate)(sum(branches[1:], branches[0]))


def cbam(
    x: torch.Tensor,
    fc1_weight: Optional[torch.Tensor],
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: Optional[torch.Tensor],
    fc2_bias: Optional[torch.Tensor],
    conv_weight: torch.Tensor,
    bn_running_mean: Optional[torch.Tensor],
    bn_running_var: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    *,
    bn_training: bool = False,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    bn_group: str = "",
    pool: str = "avg+max",
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> torch.Tensor:
    """timm.layers.cbam.CbamModule.forward (ChannelAttn then SpatialAttn); without fc1_weight,
    SpatialAttn.forward alone. The BN updates its running statistics in training, as F.batch_norm;
    with bn_group, over the batches of that process group (attn_kernels.batch_norm)."""
    if fc1_weight is not None:
        x = channel_attn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool=pool, act=act, gate=gate)
    x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    x_attn = F.conv2d(x_attn, conv_weight, padding=conv_weight.shape[-1] // 2)
    x_attn = batch_norm(x_attn, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_momentum, bn_eps,
                        bn_group)
    return x * _as_callable(gate)(x_attn)


def eca(
    x: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    conv2_weight: Optional[torch.Tensor] = None,
    conv2_bias: Optional[torch.Tensor] = None,
    *,
    circular: bool = False,
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> torch.Tensor:
    """timm.layers.EcaModule.forward (CecaModule.forward with circular=True): x * gate(conv1d
    across the channels of mean_hw(x)), zero (circular) padding keeping C outputs. With
    conv2_weight, EcaModule's use_mlp form: conv (1x1, R maps), act, then conv2 across channels.
    The view is spelled out as (N, 1, C), so that an empty batch works (timm's fails)."""
    y = x.mean((2, 3)).view(x.shape[0], 1, x.shape[1])
    if conv2_weight is not None:
        y = _as_callable(act)(F.conv1d(y, conv_weight, conv_bias))
        conv_weight, conv_bias = conv2_weight, conv2_bias
    pad = (conv_weight.shape[-1] - 1) // 2
    if circular:
        y = F.conv1d(F.pad(y, (pad, pad), mode="circular"), conv_weight, conv_bias)
    else:
        y = F.conv1d(y, conv_weight, conv_bias, padding=pad)
    y = _as_callable(gate)(y).view(x.shape[0], x.shape[1], 1, 1)
    return x * y.expand_as(x)


def _gc_transform(weights, context, eps, act_fn):
    """timm's ConvMlp(norm_layer=LayerNorm2d) on a (N, C, 1, 1) context: fc1, LayerNorm over the
    hidden channels, act, fc2 (mmcv's Sequential computes the same)."""
    fc1_weight, fc1_bias, ln_weight, ln_bias, fc2_weight, fc2_bias = weights
    h = F.conv2d(context, fc1_weight, fc1_bias).permute(0, 2, 3, 1)
    h = F.layer_norm(h, h.shape[-1:], ln_weight.reshape(-1), ln_bias.reshape(-1), eps).permute(0, 3, 1, 2)
    return F.conv2d(act_fn(h), fc2_weight, fc2_bias)


def attention_context(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """GC's context by attention pooling: x's pixels weighted by the softmax over H*W of the
    (N, 1, H, W) logits, as (N, C, 1, 1). Typed for TorchScript: the GC drop-ins' reference_forward
    (attn_kernels.nn) calls it too."""
    B, C, H, W = x.shape
    attn = torch.softmax(logits.reshape(B, 1, H * W), dim=-1).unsqueeze(3)
    return (x.reshape(B, C, H * W).unsqueeze(1) @ attn).view(B, C, 1, 1)


def gc(
    x: torch.Tensor,
    attn_weight: Optional[torch.Tensor],
    attn_bias: Optional[torch.Tensor],
    scale_weights: Optional[Sequence[torch.Tensor]],
    add_weights: Optional[Sequence[torch.Tensor]],
    *,
    scale_eps: float = 1e-6,
    add_eps: float = 1e-6,
    act: Act = "relu",
    gate: Act = "sigmoid",
) -> torch.Tensor:
    """timm.layers.GlobalContext.forward: context by attention pooling (softmax over H*W of a 1x1
    conv's logits) or, without attn_weight, the mean; then x * gate(t_scale(context)) and/or
    + t_add(context), each transform fc1 -> LayerNorm -> act -> fc2 (weights as in ops/gc.py)."""
    if attn_weight is not None:
        context = attention_context(x, F.conv2d(x, attn_weight, attn_bias))
    else:
        context = x.mean(dim=(2, 3), keepdim=True)
    act_fn = _as_callable(act)
    if scale_weights:
        x = x * _as_callable(gate)(_gc_transform(scale_weights, context, scale_eps, act_fn))
    if add_weights:
        x = x + _gc_transform(add_weights, context, add_eps, act_fn)
    return x


def selective_kernel(
    paths: Sequence[torch.Tensor],
    fc_reduce_weight: torch.Tensor,
    fc_select_weight: torch.Tensor,
    bn_running_mean: Optional[torch.Tensor],
    bn_running_var: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    *,
    bn_training: bool = False,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    bn_group: str = "",
    act: Act = "relu",
) -> torch.Tensor:
    """The attention part of timm.layers.SelectiveKernel.forward over its branch outputs: stack,
    SelectiveKernelAttn (sum, mean, fc_reduce, BN, act, fc_select, softmax over the paths), then
    the weighted sum of the paths. With bn_group, the BN's batch is that process group's."""
    x = torch.stack(list(paths), dim=1)
    B, P, C = x.shape[:3]
    attn = x.sum(1).mean((2, 3), keepdim=True)
    attn = F.conv2d(attn, _conv_weight(fc_reduce_weight))
    attn = batch_norm(attn, bn_running_mean, bn_running_var, bn_weight, bn_bias, bn_training, bn_momentum, bn_eps,
                      bn_group)
    attn = F.conv2d(_as_callable(act)(attn), _conv_weight(fc_select_weight))
    attn = torch.softmax(attn.view(B, P, C, 1, 1), dim=1)
    return torch.sum(x * attn, dim=1)


def scse(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    sse_weight: torch.Tensor,
    sse_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """scSE, as segmentation_models_pytorch's SCSEModule: x * cSE(x) + x * sSE(x), with
    cSE = sigmoid(conv(relu(conv(mean_hw(x))))) and sSE = sigmoid(conv1x1(x)) (C -> 1 channel)."""
    x_se = F.conv2d(F.relu(F.conv2d(x.mean((2, 3), keepdim=True), _conv_weight(fc1_weight), fc1_bias)),
                    _conv_weight(fc2_weight), fc2_bias)
    return x * torch.sigmoid(x_se) + x * torch.sigmoid(F.conv2d(x, sse_weight, sse_bias))


def sigmoid_gate(x: torch.Tensor, logits: torch.Tensor, *, residual: bool = False) -> torch.Tensor:
    """YOLOv4's SAM, x * sigmoid(logits) (logits of x's shape, or (N, 1, H, W) for the spatial
    form); with residual, Residual Attention's (1 + sigmoid(logits)) * x."""
    mask = torch.sigmoid(logits)
    return (1 + mask) * x if residual else x * mask


def non_local(
    x: torch.Tensor,
    theta_weight: torch.Tensor,
    theta_bias: Optional[torch.Tensor],
    phi_weight: torch.Tensor,
    phi_bias: Optional[torch.Tensor],
    g_weight: torch.Tensor,
    g_bias: Optional[torch.Tensor],
    *,
    scale: float,
    sub_sample: bool = False,
) -> torch.Tensor:
    """The non-local operation of timm.layers.NonLocalAttn and mmcv's NonLocal2d
    ('embedded_gaussian'), before their output conv: softmax(scale * theta(x)^T phi(x)) applied
    to g(x), with the (H*W) x (H*W) matrix materialized. sub_sample max-pools phi(x) and g(x) 2x2
    (mmcv). Returns (N, R, H, W)."""
    B, _, H, W = x.shape
    t = F.conv2d(x, theta_weight, theta_bias)
    p = F.conv2d(x, phi_weight, phi_bias)
    g = F.conv2d(x, g_weight, g_bias)
    if sub_sample:
        p, g = F.max_pool2d(p, 2), F.max_pool2d(g, 2)
    R = t.shape[1]
    t = t.view(B, R, -1).permute(0, 2, 1)
    p = p.reshape(B, R, -1)
    g = g.reshape(B, R, -1).permute(0, 2, 1)
    att = F.softmax(torch.bmm(t, p) * scale, dim=2)
    return torch.bmm(att, g).permute(0, 2, 1).reshape(B, R, H, W)


def at_map(x: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The attention map of attention transfer: the mean over channels of |x|^p, flattened and
    L2-normalized per sample (the paper's `at`, F.normalize(x.pow(2).mean(1).view(N, -1)) at p = 2)."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1))  # flatten, not view(N, -1): N may be 0


def aligned(student: torch.Tensor, teacher: torch.Tensor):
    """(student, teacher) with equal H and W: the larger of each pair adaptive-average-pooled down
    to the smaller."""
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    if tuple(student.shape[2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2) -> torch.Tensor:
    """The attention-transfer loss, mean((at_map(student) - at_map(teacher))^2), spatial sizes
    aligned first (see `aligned`); the teacher is detached."""
    student, teacher = aligned(student, teacher.detach())
    return (at_map(student, p) - at_map(teacher, p)).pow(2).mean()


def _pair_of_ints(v) -> tuple:
    return (v, v) if isinstance(v, int) else tuple(v)


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """torchvision.ops.deform_conv2d (DCNv2 with mask, DCNv1 without) in plain PyTorch ops: the
    samples gathered by index arithmetic, then one grouped matrix product, all differentiable by
    autograd (deterministic on CPU). Materializes the (N, C, kh*kw, Hout*Wout) columns: for tests.

    A sample at (y, x) is torchvision's bilinear_interpolate: the four corners, each zero outside
    the image. torchvision also returns zero outright unless -1 < y < H and -1 < x < W; the corners
    alone give that zero already, and autograd through them gives torchvision's offset gradient
    (get_coordinate_weight, non-zero at exactly y = -1 or x = -1), so no such test here."""
    sh, sw = _pair_of_ints(stride)
    ph, pw = _pair_of_ints(padding)
    dh, dw = _pair_of_ints(dilation)
    N, C, H, W = input.shape
    O, Cg, kh, kw = weight.shape
    G, K = C // Cg, kh * kw
    D = offset.shape[1] // (2 * K)
    Hout, Wout = offset.shape[2], offset.shape[3]
    P = Hout * Wout
    off = offset.reshape(N, D, K, 2, P)
    k = torch.arange(K, device=input.device)
    ho = torch.arange(Hout, device=input.device).repeat_interleave(Wout)
    wo = torch.arange(Wout, device=input.device).repeat(Hout)
    y = (ho * sh - ph + (k // kw * dh)[:, None]).to(input.dtype) + off[:, :, :, 0]  # (N, D, K, P)
    x = (wo * sw - pw + (k % kw * dw)[:, None]).to(input.dtype) + off[:, :, :, 1]
    y0, x0 = y.detach().floor(), x.detach().floor()
    ly, lx = y - y0, x - x0
    planes = input.reshape(N, D, C // D, H * W)
    samples = 0
    for cy, wy in ((0, 1 - ly), (1, ly)):
        for cx, wx in ((0, 1 - lx), (1, lx)):
            yc, xc = y0.long() + cy, x0.long() + cx
            inside = (yc >= 0) & (yc < H) & (xc >= 0) & (xc < W)
            index = (yc.clamp(0, H - 1) * W + xc.clamp(0, W - 1)).flatten(2)  # (N, D, K*P)
            corner = planes.gather(3, index[:, :, None].expand(N, D, C // D, K * P))
            samples = samples + (wy * wx).flatten(2)[:, :, None] * torch.where(inside.flatten(2)[:, :, None], corner, 0)
    if mask is not None:
        samples = samples * mask.reshape(N, D, 1, K * P)
    columns = samples.reshape(N, G, Cg * K, P)  # channel-major (c, k) rows, as weight's (Cg, kh, kw)
    out = torch.einsum("gor,ngrp->ngop", weight.reshape(G, O // G, Cg * K), columns).reshape(N, O, Hout, Wout)
    return out if bias is None else out + bias.reshape(1, O, 1, 1)
