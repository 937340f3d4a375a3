"""The per-sample channel MLP of SE and CBAM's channel attention, and its hand-written backward.

It runs on (N, C) statistics in float32 (float64 for float64 x), between the activation-sized
passes, so its cost is negligible; writing its backward by hand lets one custom op hold the whole
backward of a block, with no activation-sized intermediate handed between autograd nodes.

`pool` says how the pooled statistics feed the MLP:
    'avg'      z = mlp(mean)                         SE
    'mix'      z = mlp(0.5 * mean + 0.5 * max)       SE with add_maxpool
    'avg+max'  z = mlp(mean) + mlp(max)              CBAM (both branches share the weights)
    'max'      z = mlp(max)                          CBAM's official code with pool_types=['max']
where mlp(p) = W2 act(W1 p + b1) + b2 and the gate is gate(z).
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..activations import ACTIVATIONS

POOLS = ("avg", "mix", "avg+max", "max")


def uses_max(pool: str) -> bool:
    return pool != "avg"


def _branches(pool: str, mean: Tensor, xmax: Tensor) -> List[Tensor]:
    return {"avg": lambda: [mean], "mix": lambda: [0.5 * mean + 0.5 * xmax],
            "avg+max": lambda: [mean, xmax], "max": lambda: [xmax]}[pool]()


def _matrix(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """A 1x1-conv or linear weight as an (out, in) matrix in the math dtype."""
    return weight.reshape(weight.shape[0], -1).to(dtype)


def _linear(v: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = _matrix(weight, v.dtype)
    return torch.addmm(bias.to(v.dtype), v, w.t()) if bias is not None else v @ w.t()


class Excitation(NamedTuple):
    inputs: List[Tensor]   # per branch: the pooled vector fed to fc1
    hidden_pre: List[Tensor]  # per branch: W1 p + b1
    hidden: List[Tensor]      # per branch: act(W1 p + b1)
    logits: Tensor            # z, summed over branches
    gate: Tensor              # gate(z): the per-(n, c) scale


def excite(pool, mean, xmax, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str) -> Excitation:
    inputs = _branches(pool, mean, xmax)
    hidden_pre = [_linear(p, fc1_weight, fc1_bias) for p in inputs]
    hidden = [ACTIVATIONS[act].forward(h) for h in hidden_pre]
    logits = sum(_linear(a, fc2_weight, fc2_bias) for a in hidden)
    return Excitation(inputs, hidden_pre, hidden, logits, ACTIVATIONS[gate].forward(logits))


def excite_backward(
    pool, e: Excitation, dgate: Tensor, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act: str, gate: str
) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """From d loss / d gate (N, C): (d mean, d max, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias).

    d mean / d max are None where the pool does not use them; bias gradients are returned even
    for absent biases (callers drop them). Weight gradients come in the weights' shapes and dtypes.
    """
    dz = dgate * ACTIVATIONS[gate].derivative(e.logits)
    w1, w2 = _matrix(fc1_weight, dz.dtype), _matrix(fc2_weight, dz.dtype)
    dw1 = torch.zeros_like(w1)
    dw2 = torch.zeros_like(w2)
    db1 = dz.new_zeros(w1.shape[0])
    dinputs = []
    for p, h, a in zip(e.inputs, e.hidden_pre, e.hidden):
        dh = (dz @ w2) * ACTIVATIONS[act].derivative(h)
        dw2 += dz.t() @ a
        dw1 += dh.t() @ p
        db1 += dh.sum(0)
        dinputs.append(dh @ w1)
    db2 = dz.sum(0) * len(e.inputs)  # b2 is added once per branch
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
        dw1.reshape(fc1_weight.shape).to(fc1_weight.dtype),
        db1.to(fc1_bias.dtype if fc1_bias is not None else fc1_weight.dtype),
        dw2.reshape(fc2_weight.shape).to(fc2_weight.dtype),
        db2.to(fc2_bias.dtype if fc2_bias is not None else fc2_weight.dtype),
    )
