"""The per-sample excitation of the channel-gate blocks (SE, ECA, CBAM's channel attention): the
small function from pooled (N, C) statistics to the (N, C) gate, and its hand-written backward.

It runs in float32 (float64 for float64 x) between the activation-sized passes, so its cost is
negligible; writing its backward by hand lets one custom op hold the whole backward of a block,
with no activation-sized intermediate handed between autograd nodes.

`pool` says how the pooled statistics feed the mixer:
    'avg'      z = mix(mean)                         SE, ECA
    'mix'      z = mix(0.5 * mean + 0.5 * max)       SE with add_maxpool
    'avg+max'  z = mix(mean) + mix(max)              CBAM (both branches share the weights)
    'max'      z = mix(max)                          CBAM's official code with pool_types=['max']
`mix` says how the channels of a pooled vector p (N, C) are mixed:
    'mlp'            W2 act(W1 p + b1) + b2 with 1x1-conv or linear weights        SE, CBAM
    'conv'           conv1d across channels, zero padding: w2 * h + b2, where     ECA
                     h = p, or h = act(w1 p + b1) (R hidden maps) with a first conv
    'circular_conv'  the same with circular padding                               CECA
and the gate is gate(z). The fc1 weights (w1, b1) are optional: without them h = p and no
activation applies ('mlp' is then one linear layer, W2 p + b2: timm's EffectiveSEModule).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..activations import ACTIVATIONS

POOLS = ("avg", "mix", "avg+max", "max")
MIXES = ("mlp", "conv", "circular_conv")


def uses_max(pool: str) -> bool:
    return pool != "avg"


def _branches(pool: str, mean: Tensor, xmax: Tensor) -> List[Tensor]:
    return {"avg": lambda: [mean], "mix": lambda: [0.5 * mean + 0.5 * xmax],
            "avg+max": lambda: [mean, xmax], "max": lambda: [xmax]}[pool]()


def matrix(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1x1-conv or linear weight as an (out, in) matrix in the math dtype."""
    return weight.reshape(weight.shape[0], -1).to(dtype)


def linear(v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """v @ W.t() + b in v's dtype, W a 1x1-conv or linear weight."""
    w = matrix(weight, v.dtype)
    return torch.addmm(bias.to(v.dtype), v, w.t()) if bias is not None else v @ w.t()


class Excitation(NamedTuple):
    inputs: List[Tensor]      # per branch: the pooled vector p (N, C)
    hidden_pre: List[Tensor]  # per branch: W1 p + b1 ((N, R); (N, R, C) for the conv mixes)
    hidden: List[Tensor]      # per branch: act(hidden_pre), what the second layer reads
    logits: Tensor            # z (N, C), summed over branches
    gate: Tensor              # gate(z): the per-(n, c) scale


def _conv_padding(weight: Tensor, mix: str) -> Tuple[int, int]:
    """(padding given to the conv, padding added by hand) of a channel conv with weight (1, R, k)."""
    pad = weight.shape[-1] // 2
    return (0, pad) if mix == "circular_conv" else (pad, 0)


def _channel_conv_input(h: Tensor, weight: Tensor, mix: str) -> Tensor:
    """h (N, R, C) as the channel conv reads it: circularly padded by hand for 'circular_conv'."""
    manual = _conv_padding(weight, mix)[1]
    return torch.nn.functional.pad(h, (manual, manual), mode="circular") if manual else h


def _first_layer(mix: str, p: Tensor, fc1_weight: Optional[Tensor], fc1_bias: Optional[Tensor]) -> Tensor:
    if fc1_weight is None:
        return p if mix == "mlp" else p[:, None, :]
    if mix == "mlp":
        return linear(p, fc1_weight, fc1_bias)
    # A 1x1 Conv1d(1, R) over the channel axis: R scaled copies of p.
    h = matrix(fc1_weight, p.dtype).reshape(1, -1, 1) * p[:, None, :]
    return h + fc1_bias.to(p.dtype).reshape(1, -1, 1) if fc1_bias is not None else h


def _second_layer(mix: str, h: Tensor, fc2_weight: Tensor, fc2_bias: Optional[Tensor]) -> Tensor:
    if mix == "mlp":
        return linear(h, fc2_weight, fc2_bias)
    bias = fc2_bias.to(h.dtype) if fc2_bias is not None else None
    padding = _conv_padding(fc2_weight, mix)[0]
    z = torch.nn.functional.conv1d(_channel_conv_input(h, fc2_weight, mix), fc2_weight.to(h.dtype), bias, padding=padding)
    return z[:, 0]


def excite(mix, pool, mean, xmax, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str) -> Excitation:
    inputs = _branches(pool, mean, xmax)
    hidden_pre = [_first_layer(mix, p, fc1_weight, fc1_bias) for p in inputs]
    # Without a first layer (plain ECA, effective SE) there is no activation either.
    act_fn = ACTIVATIONS[act].forward if fc1_weight is not None else ACTIVATIONS["identity"].forward
    hidden = [act_fn(h) for h in hidden_pre]
    logits = sum(_second_layer(mix, a, fc2_weight, fc2_bias) for a in hidden)
    return Excitation(inputs, hidden_pre, hidden, logits, ACTIVATIONS[gate].forward(logits))


def _second_layer_backward(mix, dz: Tensor, h: Tensor, fc2_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(d h, d fc2_weight) of z = second_layer(h), in the math dtype."""
    if mix == "mlp":
        w2 = matrix(fc2_weight, dz.dtype)
        return dz @ w2, dz.t() @ h
    padding, manual = _conv_padding(fc2_weight, mix)
    w2 = fc2_weight.to(dz.dtype)
    dh, dw2, _ = torch.ops.aten.convolution_backward(
        dz[:, None, :], _channel_conv_input(h, w2, mix), w2, None, [1], [padding], [1], False, [0], 1,
        [True, True, False],
    )
    if manual:  # fold the circular padding's gradient back onto the channels it copied
        C = h.shape[-1]
        core = dh[..., manual:manual + C].clone()
        core[..., C - manual:] += dh[..., :manual]
        core[..., :manual] += dh[..., manual + C:]
        dh = core
    return dh, dw2


def _first_layer_backward(mix, dh: Tensor, p: Tensor, fc1_weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(d p, d fc1_weight, d fc1_bias) of h = first_layer(p), given d h (before the activation)."""
    if fc1_weight is None:
        return (dh if mix == "mlp" else dh[:, 0]), None, None
    if mix == "mlp":
        return dh @ matrix(fc1_weight, dh.dtype), dh.t() @ p, dh.sum(0)
    w1 = matrix(fc1_weight, dh.dtype).reshape(1, -1, 1)
    return (dh * w1).sum(1), (dh * p[:, None, :]).sum((0, 2)), dh.sum((0, 2))


def excite_backward(
    mix, pool, e: Excitation, dgate: Tensor, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str
) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """From d loss / d gate (N, C): (d mean, d max, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias).

    d mean / d max are None where the pool does not use them. Bias gradients are returned even
    for absent biases, and fc1 gradients are empty (0,) tensors without fc1_weight (callers drop
    them). Weight gradients come in the weights' shapes and dtypes.
    """
    dz = ACTIVATIONS[gate].backward(dgate, e.logits)
    has_fc1 = fc1_weight is not None
    dw1 = db1 = dw2 = None
    dinputs = []
    for p, h_pre, h in zip(e.inputs, e.hidden_pre, e.hidden):
        dh, dw2_branch = _second_layer_backward(mix, dz, h, fc2_weight)
        dw2 = dw2_branch if dw2 is None else dw2 + dw2_branch
        if has_fc1:
            dh = ACTIVATIONS[act].backward(dh, h_pre)
        dp, dw1_branch, db1_branch = _first_layer_backward(mix, dh, p, fc1_weight)
        if has_fc1:
            dw1 = dw1_branch if dw1 is None else dw1 + dw1_branch
            db1 = db1_branch if db1 is None else db1 + db1_branch
        dinputs.append(dp)
    db2 = (dz.sum(0) if mix == "mlp" else dz.sum()) * len(e.inputs)  # b2 is added once per branch
    if pool == "avg":
        dmean, dmax = dinputs[0], None
    elif pool == "max":
        dmean, dmax = None, dinputs[0]
    elif pool == "mix":
        dmean = dmax = 0.5 * dinputs[0]
    else:
        dmean, dmax = dinputs
    return (
        dmean,
        dmax,
        dw1.reshape(fc1_weight.shape).to(fc1_weight.dtype) if has_fc1 else dz.new_empty((0,)),
        db1.to(fc1_bias.dtype if fc1_bias is not None else fc1_weight.dtype) if has_fc1 else dz.new_empty((0,)),
        dw2.reshape(fc2_weight.shape).to(fc2_weight.dtype),
        db2.reshape(fc2_weight.shape[:1]).to(fc2_bias.dtype if fc2_bias is not None else fc2_weight.dtype),
    )
