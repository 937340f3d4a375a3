"""ECA and circular ECA: reference vs timm, kernels vs reference, gradients, the op contract, the
official code's layout, empty batches, bad input.

The fused path is the channel-gate op of SE (ops/channel_gate.py) with a conv across channels as
its mixer. Kernel tests run the 'triton' backend in Triton's interpreter on CPU where there is no
GPU; the GPU tier (test_gpu.py) runs both backends at real shapes.
"""
import math

import pytest
import torch
import torch.nn.functional as tf
from torch import nn

import attn_kernels
from attn_kernels import functional as F
from attn_kernels.ops.channel_gate import channel_gate_backward, channel_gate_forward
from helpers import (
    check_against_rewrite, check_compiles_without_graph_break, check_empty_batch, check_kernel_against_reference, make_pair,
    make_x, run, saved_for_backward, timm_layers,
)

LAYOUTS = ["nchw", "channels_last"]
interpreted_only = pytest.mark.skipif(torch.cuda.is_available(), reason="covered at real shapes by the GPU tests")

# (description, block, shape, constructor kwargs): small shapes for the interpreter.
SAMPLES = [
    ("odd sizes", "eca", (2, 13, 5, 7), {}),
    ("H*W = 1", "eca", (3, 16, 1, 1), {}),
    ("H = 1, k = 5", "eca", (2, 12, 1, 9), {"kernel_size": 5}),
    ("use_mlp", "eca", (2, 32, 4, 3), {"use_mlp": True}),
    ("use_mlp, silu, hard_sigmoid", "eca", (2, 24, 3, 5), {"use_mlp": True, "act_layer": "silu",
                                                          "gate_layer": "hard_sigmoid"}),
    ("circular", "ceca", (2, 13, 5, 7), {}),
    ("circular, wraps past both ends", "ceca", (2, 4, 3, 3), {"kernel_size": 7}),
    ("circular with bias", "ceca", (2, 10, 4, 4), {"act_layer": nn.ReLU}),
]


def pair(block, channels, kwargs):
    # With kernel_size given, leave channels out so that timm keeps it.
    args = () if "kernel_size" in kwargs and not kwargs.get("use_mlp") else (channels,)
    return make_pair(block, *args, **kwargs)


# ---- the reference is timm ------------------------------------------------------------------

@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s[0])
def test_reference_backend_matches_timm_bitwise(sample):
    _, block, shape, kwargs = sample
    eager, fused = pair(block, shape[1], kwargs)
    x = make_x(shape)
    dy = make_x(shape, seed=1)
    y_e, dx_e, g_e = run(eager, x, dy)
    y_f, dx_f, g_f = run(fused, x, dy, backend="reference")
    assert torch.equal(y_e, y_f) and torch.equal(dx_e, dx_f)
    for name in g_e:
        assert torch.equal(g_e[name], g_f[name]), name


@pytest.mark.parametrize("channels", [16, 64, 256, 1024, 2048, 100])
@pytest.mark.parametrize("block", ["eca", "ceca"])
def test_kernel_size_rule_and_state_dict(block, channels):
    make_eager, make_fused = {"eca": (timm_layers.EcaModule, attn_kernels.FusedECA),
                              "ceca": (timm_layers.CecaModule, attn_kernels.FusedCECA)}[block]
    eager, fused = make_eager(channels), make_fused(channels)
    assert fused.conv.kernel_size == eager.conv.kernel_size
    assert list(eager.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(fused.state_dict(), strict=True)
    mlp = attn_kernels.FusedECA(channels, use_mlp=True)
    assert {k: v.shape for k, v in mlp.state_dict().items()} == \
        {k: v.shape for k, v in timm_layers.EcaModule(channels, use_mlp=True).state_dict().items()}


def test_repr():
    assert "kernel_size=5" in repr(attn_kernels.FusedECA(256))
    assert "use_mlp=True, rd_channels=8" in repr(attn_kernels.FusedECA(64, use_mlp=True))
    assert "circular=True" in repr(attn_kernels.FusedCECA(64))


# ---- kernels vs reference -------------------------------------------------------------------

@interpreted_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s[0])
def test_kernel_matches_reference(sample, layout, poisoned, cpu_kernel_backend):
    _, block, shape, kwargs = sample
    x = make_x(shape, layout=layout)
    eager_args = () if "kernel_size" in kwargs and not kwargs.get("use_mlp") else None
    if eager_args is None:
        check_kernel_against_reference(cpu_kernel_backend, x, block, kwargs)
    else:  # kernel_size as given: no channels argument
        eager, fused = pair(block, shape[1], kwargs)
        dy = make_x(shape, seed=1, layout=layout)
        y_k, dx_k, g_k = run(fused, x, dy, cpu_kernel_backend)
        y_r, dx_r, g_r = run(eager.double(), x.double(), dy.double())
        torch.testing.assert_close(y_k, y_r.float())
        torch.testing.assert_close(dx_k, dx_r.float())
        for name in g_r:
            torch.testing.assert_close(g_k[name], g_r[name].float(), msg=name)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("block, kwargs", [("eca", {}), ("eca", {"use_mlp": True}), ("ceca", {})], ids=str)
def test_kernel_dtypes(block, kwargs, dtype, poisoned, cpu_kernel_backend):
    for layout in LAYOUTS:
        check_kernel_against_reference(cpu_kernel_backend, make_x((2, 24, 5, 7), dtype, layout=layout), block, kwargs)


@pytest.mark.parametrize("mode", ["conv", "circular", "mlp"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(mode, layout, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dd = {"dtype": torch.float64, "device": device}
    x = make_x((2, 7, 3, 4), torch.float64, device, layout).requires_grad_()
    torch.manual_seed(0)
    if mode == "mlp":
        params = [torch.randn(3, 1, 1, **dd), torch.randn(3, **dd), torch.randn(1, 3, 5, **dd), torch.randn(1, **dd)]
    else:
        params = [torch.randn(1, 1, 5, **dd), torch.randn(1, **dd)]
    params = [p.requires_grad_() for p in params]

    def f(x, *p):
        return F.eca(x, *p, circular=mode == "circular", act="silu")

    with attn_kernels.use_backend(kernel_backend):
        assert F.eca_dispatch(x).backend == kernel_backend
        # fast_mode checks a random projection of the Jacobian: the interpreter is slow.
        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("mix, first", [("conv", False), ("circular_conv", False), ("conv", True)], ids=str)
def test_opcheck(mix, first, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = make_x((2, 8, 3, 5), device=device)
    if first:
        weights = [torch.randn(4, 1, 1, device=device), torch.randn(4, device=device),
                   torch.randn(1, 4, 3, device=device), torch.randn(1, device=device)]
    else:
        weights = [None, None, torch.randn(1, 1, 3, device=device), None]
    config = ("avg", mix, "relu", "sigmoid", kernel_backend)
    # The ops have no derivative of their own (autograd is ChannelGate around them, which the
    # gradcheck tests cover): inputs that do not require grad.
    plain = [x, *weights]
    torch.library.opcheck(channel_gate_forward, (*plain, *config))
    _, mean, xmax = channel_gate_forward(*plain, *config)
    torch.library.opcheck(channel_gate_backward, (torch.randn_like(x), *plain, mean, xmax, *config))


def test_compile_fullgraph_has_no_graph_break():
    check_compiles_without_graph_break(make_pair("eca", 16)[1], 16)


def test_saves_only_x_and_per_channel_statistics(cpu_kernel_backend):
    x = make_x((2, 32, 8, 8)).requires_grad_()
    _, fused = make_pair("eca", 32, use_mlp=True)
    saved = saved_for_backward(fused, x, cpu_kernel_backend)
    activation_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()
    params = sum(p.numel() for p in fused.parameters())
    assert sum(t.numel() for t in saved) <= x.numel() + params + 2 * x.shape[0] * x.shape[1]


def test_deterministic_bitwise(cpu_kernel_backend):
    x = make_x((2, 24, 9, 7))
    dy = make_x((2, 24, 9, 7), seed=3)
    _, fused = make_pair("ceca", 24)
    first, second = run(fused, x, dy, cpu_kernel_backend), run(fused, x, dy, cpu_kernel_backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


# ---- the official code's layout -------------------------------------------------------------

def official_semantics(x, conv_weight):
    """What the paper's eca_layer computes, written out with torch.nn.functional: global average
    pooling, a bias-free Conv1d(1, 1, k) over the channel axis (zero padding), sigmoid, rescale."""
    y = tf.adaptive_avg_pool2d(x, 1)
    y = tf.conv1d(y.squeeze(-1).transpose(-1, -2), conv_weight, padding=(conv_weight.shape[-1] - 1) // 2)
    return x * torch.sigmoid(y.transpose(-1, -2).unsqueeze(-1))


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("k_size", [3, 5])
def test_official_layout_matches_the_papers_code(k_size):
    torch.manual_seed(0)
    module = attn_kernels.FusedECAOfficial(32, k_size=k_size).double()
    assert list(module.state_dict()) == ["conv.weight"] and module.conv.weight.shape == (1, 1, k_size)
    weight = module.conv.weight.detach().clone().requires_grad_()
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    check_against_rewrite(module, x, lambda x: official_semantics(x, weight), {"conv.weight": weight})


# ---- empty batches and bad input --------------------------------------------------------------

@pytest.mark.parametrize("module", [lambda: attn_kernels.FusedECA(8), lambda: attn_kernels.FusedECA(8, use_mlp=True),
                                    lambda: attn_kernels.FusedCECA(8), lambda: attn_kernels.FusedECAOfficial(8)])
def test_empty_batch(module):
    """N = 0 works (timm's EcaModule raises instead)."""
    check_empty_batch(module(), 8)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="conv_weight must be a \\(1, 1, k\\) tensor with odd k"):
        F.eca(x, torch.randn(1, 1, 4), None)
    with pytest.raises(ValueError, match="conv2_weight must be a \\(1, 3, k\\) tensor with odd k"):
        F.eca(x, torch.randn(3, 1, 1), None, torch.randn(1, 2, 3), None)
    with pytest.raises(ValueError, match="conv_bias must have shape \\(1,\\)"):
        F.eca(x, torch.randn(1, 1, 3), torch.randn(2))
    with pytest.raises(ValueError, match="circular padding by 3 .* needs at least 3"):
        F.eca(torch.randn(2, 2, 4, 4), torch.randn(1, 1, 7), None, circular=True)
    with pytest.raises(ValueError, match="x must be 4-D"):
        attn_kernels.FusedECA(8)(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        attn_kernels.FusedECA(kernel_size=4)
    with pytest.raises(ValueError, match="use_mlp=True needs channels"):
        attn_kernels.FusedECA(use_mlp=True)
    with pytest.raises(ValueError, match="channel must be a positive int"):
        attn_kernels.FusedECAOfficial(0)


def test_kernel_size_rule_is_timms():
    for channels in (8, 64, 512, 4096):
        t = int(abs(math.log(channels, 2) + 1) / 2)
        assert attn_kernels.FusedECA(channels).conv.kernel_size[0] == max(t if t % 2 else t + 1, 3)
