"""Global context (GCNet): reference vs timm, kernels vs reference, the one-pass attention pooling,
gradients, the op contract, mmcv's layout, empty batches, bad input.

Kernel tests run the 'triton' backend in Triton's interpreter on CPU where there is no GPU; the
GPU tier (test_gpu.py) runs both backends at real shapes.
"""
import importlib

import pytest
import torch
import torch.nn.functional as tf
from torch import nn

import attn_kernels
from attn_kernels import functional as F
from attn_kernels.ops.gc import gc_backward, gc_forward
from helpers import (
    check_against_rewrite, check_compiles_without_graph_break, check_empty_batch, check_kernel_against_reference,
    check_launch_budget, make_pair, make_x, run, saved_for_backward, timm_layers,
)

LAYOUTS = ["nchw", "channels_last"]
interpreted_only = pytest.mark.skipif(torch.cuda.is_available(), reason="covered at real shapes by the GPU tests")

# GlobalContext configurations: timm's default (attention, scale), both fusions, mmcv's default
# (attention, add), mean pooling, and other activations.
CONFIGS = {
    "att+scale": {},
    "att+scale+add": {"fuse_add": True},
    "att+add": {"fuse_add": True, "fuse_scale": False},
    "avg+scale+add": {"use_attn": False, "fuse_add": True},
    "avg+scale": {"use_attn": False},
    "silu, hard_sigmoid": {"fuse_add": True, "act_layer": "silu", "gate_layer": "hard_sigmoid"},
}
# (description, shape): small shapes for the interpreter.
SHAPES = [("odd sizes", (2, 13, 5, 7)), ("H*W = 1", (3, 16, 1, 1)), ("H = 1", (2, 12, 1, 9))]


def pair(channels, config, **kwargs):
    return make_pair("gc", channels, rd_ratio=0.25, **CONFIGS[config], **kwargs)


# ---- the reference is timm ------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS)
def test_reference_backend_matches_timm_bitwise(config):
    eager, fused = pair(16, config)
    x = make_x((2, 16, 5, 6))
    dy = make_x((2, 16, 5, 6), seed=1)
    y_e, dx_e, g_e = run(eager, x, dy)
    y_f, dx_f, g_f = run(fused, x, dy, backend="reference")
    assert torch.equal(y_e, y_f) and torch.equal(dx_e, dx_f)
    for name in g_e:
        assert (g_e[name] is None and g_f[name] is None) or torch.equal(g_e[name], g_f[name]), name


@pytest.mark.parametrize("config", CONFIGS)
def test_construction_matches_timm(config):
    """Same state_dict keys, and from the same seed the same initial values (timm's init)."""
    kwargs = CONFIGS[config]
    torch.manual_seed(0)
    eager = timm_layers.GlobalContext(40, **kwargs)
    torch.manual_seed(0)
    fused = attn_kernels.FusedGC(40, **kwargs)
    assert list(eager.state_dict()) == list(fused.state_dict())
    for (name, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name
    eager.load_state_dict(fused.state_dict(), strict=True)


def test_repr():
    assert "use_attn=True, fuse_add=False, fuse_scale=True, rd_channels=8" in repr(attn_kernels.FusedGC(64))
    assert "planes=16, pooling_type='att', fusion_types=('channel_add',)" in \
        repr(attn_kernels.FusedContextBlock(64, 1 / 4))


# ---- kernels vs reference -------------------------------------------------------------------

@interpreted_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sample", SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("config", CONFIGS)
def test_kernel_matches_reference(config, sample, layout, poisoned, cpu_kernel_backend):
    check_kernel_against_reference(cpu_kernel_backend, make_x(sample[1], layout=layout), "gc",
                                   {"rd_ratio": 0.25, **CONFIGS[config]})


def timm_attention_init(module):
    """conv_attn as timm initializes it (Kaiming normal, fan_in): logits of unit scale. The tests'
    random parameters (std 0.5) give logits spread over about 50 at C = 1024, a softmax saturated
    to one pixel, where conv_attn.weight's gradient (|g| <= 0.09 at 1024 x 14 x 14) is a small
    difference of large sums: the kernels' float32 error there is 3e-5 to 6e-5, 20 to 40 times
    eager's on the CPU (a known limit; 6e-4 before the logits' gradient was taken as one sum of
    differences, attention_pool.py)."""
    nn.init.kaiming_normal_(module.conv_attn.weight, mode="fan_in", nonlinearity="relu")


@interpreted_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("stage", [(256, 56), (512, 28), (1024, 14), (2048, 7)], ids=lambda s: f"{s[0]}x{s[1]}x{s[1]}")
def test_resnet50_stage_shapes(stage, layout, cpu_kernel_backend):
    """At the widths of a real model (ResNet-50's stages, N = 1): the tiles, splits and warps the
    small shapes above never reach."""
    C, S = stage
    check_kernel_against_reference(cpu_kernel_backend, make_x((1, C, S, S), layout=layout), "gc",
                                   {"rd_ratio": 0.25, **CONFIGS["att+scale+add"]}, init=timm_attention_init)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("config", ["att+scale+add", "avg+scale+add"])
def test_kernel_dtypes(config, dtype, poisoned, cpu_kernel_backend):
    for layout in LAYOUTS:
        check_kernel_against_reference(cpu_kernel_backend, make_x((2, 24, 5, 7), dtype, layout=layout), "gc",
                                       {"rd_ratio": 0.25, **CONFIGS[config]})


@interpreted_only
def test_attention_pool_over_many_tiles_and_splits(monkeypatch, poisoned):
    """Force small tiles and several H*W splits, so the online softmax rescales across tiles and
    the splits' partials are combined; compare with float64 math, and large logits."""
    from attn_kernels.triton import channel_gate

    module = importlib.import_module("attn_kernels.triton.attention_pool")  # the package exports a function so named

    monkeypatch.setattr(module, "_TILE_ELEMENTS", 32)
    monkeypatch.setattr(channel_gate, "TARGET_PROGRAMS_PER_SM", 8)
    torch.manual_seed(0)
    for layout in LAYOUTS:
        x = make_x((2, 5, 19, 17), torch.float64, layout=layout)
        weight, bias = torch.randn(5, dtype=torch.float64) * 20, torch.randn(1, dtype=torch.float64)  # peaked softmax
        assert module.split_hw(x, 5, module.tile_shape(x)[1])[1] > 1  # a program takes every channel
        context, lse = module.attention_pool(x, weight, bias)
        logits = torch.einsum("nchw,c->nhw", x, weight).reshape(2, -1) + bias
        expected = torch.einsum("ncp,np->nc", x.reshape(2, 5, -1), logits.softmax(-1))
        torch.testing.assert_close(context, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=1e-13, atol=1e-12)


@interpreted_only
@pytest.mark.parametrize("gated", [False, True], ids=["no gate", "gate"])
def test_attention_pool_backward_over_many_chunks_tiles_and_splits(monkeypatch, poisoned, gated):
    """Force small steps: each pixel tile in several chunks of channels, each split in several
    tiles (dweight's row stored by the first, added to by the others), several splits; compare dx
    and dweight with autograd through float64 math, and a peaked softmax."""
    from attn_kernels.triton import channel_gate

    module = importlib.import_module("attn_kernels.triton.attention_pool")  # the package exports a function so named

    monkeypatch.setattr(module, "_TILE_ELEMENTS", 32)
    monkeypatch.setattr(channel_gate, "TARGET_PROGRAMS_PER_SM", 8)
    torch.manual_seed(0)
    N, C, H, W = 2, 5, 19, 17
    for layout in LAYOUTS:
        x = make_x((N, C, H, W), torch.float64, layout=layout)
        dy = make_x((N, C, H, W), torch.float64, layout=layout, seed=1)
        block_c, block_hw = module.tile_shape(x)
        _, splits, per_split = module.split_hw(x, C, block_hw)
        assert block_c < C and per_split > block_hw and splits > 1
        weight, bias = torch.randn(C, dtype=torch.float64) * 20, torch.randn(1, dtype=torch.float64)  # peaked softmax
        gate = torch.rand(N, C, dtype=torch.float64) if gated else None
        dcontext = torch.randn(N, C, dtype=torch.float64)
        context, lse = module.attention_pool(x, weight, bias)
        dx, dweight = module.attention_pool_backward(dy, x, gate, context, dcontext, weight, bias, lse)

        x_ref, weight_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = torch.einsum("nchw,c->nhw", x_ref, weight_ref).reshape(N, -1) + bias
        context_ref = torch.einsum("ncp,np->nc", x_ref.reshape(N, C, -1), logits.softmax(-1))
        (context_ref * dcontext).sum().backward()
        expected_dx = x_ref.grad + dy * (gate[:, :, None, None] if gated else 1)
        torch.testing.assert_close(dx, expected_dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dweight, weight_ref.grad, rtol=1e-12, atol=1e-12)
        assert dx.stride() == dy.stride()


@interpreted_only
@pytest.mark.parametrize("config", CONFIGS)
def test_triton_several_programs_per_sample(monkeypatch, poisoned, config):
    """Force small tiles and several H*W splits per sample, so the last program of each sample
    folds the partials of the others (the online softmax's, the sums of dy*x and dy) and the
    attention backward's last program folds d attn_weight over (split, n): float64 against the
    reference, and the per-sample counters left at zero."""
    from attn_kernels.triton import channel_gate, excite

    triton_gc = importlib.import_module("attn_kernels.triton.gc")
    monkeypatch.setattr(importlib.import_module("attn_kernels.triton.attention_pool"), "_TILE_ELEMENTS", 32)
    monkeypatch.setattr(channel_gate, "TARGET_PROGRAMS_PER_SM", 8)
    for layout in LAYOUTS:
        x = make_x((2, 12, 19, 17), torch.float64, layout=layout)
        plan = triton_gc._plan(x, True, 3, 3)
        assert plan.grid[1] > 1 and plan.hw_per_split > plan.block_hw and plan.block_c < 12
        check_kernel_against_reference("triton", x, "gc", {"rd_ratio": 0.25, **CONFIGS[config]},
                                       init=timm_attention_init if "att" in config else None)
        assert not excite._tickets[x.device].any()


@pytest.mark.parametrize("config", ["att+scale+add", "att+add", "avg+scale+add"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(config, layout, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, fused = pair(6, config, dtype=torch.float64, device=device)
    x = make_x((2, 6, 3, 4), torch.float64, device, layout).requires_grad_()
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]

    def f(x, *p):
        return torch.func.functional_call(fused, dict(zip(names, p)), (x,))

    with attn_kernels.use_backend(kernel_backend):
        assert fused.dispatch(x).backend == kernel_backend
        # fast_mode checks a random projection of the Jacobian: the interpreter is slow.
        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


# The launch budget of issue 26 for GC: forward <= 3, backward <= 4 (our kernels plus every aten op
# that launches a kernel on a GPU), every parameter gradient included.
GC_BLOCKS = {
    "GlobalContext": lambda c: attn_kernels.FusedGC(c),
    "GlobalContext fuse_add": lambda c: attn_kernels.FusedGC(c, fuse_add=True),
    "GlobalContext fuse_add only": lambda c: attn_kernels.FusedGC(c, fuse_add=True, fuse_scale=False),
    "GlobalContext avg": lambda c: attn_kernels.FusedGC(c, use_attn=False, fuse_add=True),
    "ContextBlock": lambda c: attn_kernels.FusedContextBlock(c, 1 / 16),
    "ContextBlock avg add+mul": lambda c: attn_kernels.FusedContextBlock(c, 1 / 16, "avg",
                                                                          ("channel_add", "channel_mul")),
}


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("block", list(GC_BLOCKS))
def test_triton_launch_budget_at_resnet50_shapes(block):
    check_launch_budget(GC_BLOCKS[block], "triton", forward=3, backward=4)


def op_args(backend, device):
    torch.manual_seed(0)
    x = make_x((2, 8, 3, 5), device=device)

    def transform():
        return [torch.randn(4, 8, 1, 1, device=device), torch.randn(4, device=device), torch.rand(4, device=device),
                torch.randn(4, device=device), torch.randn(8, 4, 1, 1, device=device), torch.randn(8, device=device)]

    return x, torch.randn(1, 8, 1, 1, device=device), torch.randn(1, device=device), transform(), transform(), \
        (1e-6, 1e-5, "relu", "sigmoid", backend)


@pytest.mark.parametrize("pooling", ["att", "avg"])
def test_opcheck(pooling, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, attn_w, attn_b, scale, add, config = op_args(kernel_backend, device)
    if pooling == "avg":
        attn_w = attn_b = None
    # The ops have no derivative of their own: autograd is GC around them (the gradcheck tests
    # cover it), so they are checked on inputs that do not require grad.
    torch.library.opcheck(gc_forward, (x, attn_w, attn_b, scale, add, *config))
    _, context, lse = gc_forward(x, attn_w, attn_b, scale, add, *config)
    torch.library.opcheck(gc_backward, (torch.randn_like(x), x, attn_w, attn_b, scale, add, context, lse, *config))
    # One term absent: its weights' gradients are an empty list.
    torch.library.opcheck(gc_backward, (torch.randn_like(x), x, attn_w, attn_b, [], add, context, lse, *config))


def test_compile_fullgraph_has_no_graph_break():
    check_compiles_without_graph_break(pair(16, "att+scale+add")[1], 16)


def test_saves_only_x_and_small_statistics(cpu_kernel_backend):
    """Backward keeps x plus the (N, C) context, the (N,) log-sum-exp and the weights; timm keeps
    the softmax (N*H*W) and x several times over."""
    x = make_x((2, 32, 8, 8)).requires_grad_()
    _, fused = pair(32, "att+scale+add")
    saved = saved_for_backward(fused, x, cpu_kernel_backend)
    activation_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()
    params = sum(p.numel() for p in fused.parameters())
    assert sum(t.numel() for t in saved) <= x.numel() + params + x.shape[0] * x.shape[1] + x.shape[0]


def test_deterministic_bitwise(cpu_kernel_backend):
    x = make_x((2, 24, 9, 7))
    dy = make_x((2, 24, 9, 7), seed=3)
    _, fused = pair(24, "att+scale+add")
    first, second = run(fused, x, dy, cpu_kernel_backend), run(fused, x, dy, cpu_kernel_backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


# ---- mmcv's layout --------------------------------------------------------------------------

def mmcv_semantics(x, state, pooling_type, fusion_types):
    """What mmcv's ContextBlock computes, written out with torch.nn.functional from a state_dict
    in its layout: conv_mask and a softmax over H*W (or average pooling), then per fusion conv ->
    LayerNorm([planes, 1, 1], eps 1e-5) -> ReLU -> conv; the product with sigmoid first, then the sum."""
    B, C, H, W = x.shape
    if pooling_type == "att":
        mask = tf.softmax(tf.conv2d(x, state["conv_mask.weight"], state["conv_mask.bias"]).reshape(B, 1, H * W), dim=2)
        context = torch.matmul(x.reshape(B, 1, C, H * W), mask.unsqueeze(-1)).reshape(B, C, 1, 1)
    else:
        context = tf.adaptive_avg_pool2d(x, 1)

    def transform(prefix):
        h = tf.conv2d(context, state[f"{prefix}.0.weight"], state[f"{prefix}.0.bias"])
        h = tf.layer_norm(h, h.shape[1:], state[f"{prefix}.1.weight"], state[f"{prefix}.1.bias"], 1e-5)
        return tf.conv2d(tf.relu(h), state[f"{prefix}.3.weight"], state[f"{prefix}.3.bias"])

    out = x
    if "channel_mul" in fusion_types:
        out = out * torch.sigmoid(transform("channel_mul_conv"))
    if "channel_add" in fusion_types:
        out = out + transform("channel_add_conv")
    return out


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("pooling_type", ["att", "avg"])
@pytest.mark.parametrize("fusion_types", [("channel_add",), ("channel_mul",), ("channel_add", "channel_mul")], ids=str)
def test_mmcv_layout_matches_mmcvs_code(pooling_type, fusion_types):
    torch.manual_seed(0)
    module = attn_kernels.FusedContextBlock(32, 1 / 4, pooling_type=pooling_type, fusion_types=fusion_types).double()
    parts = {"channel_add": "channel_add_conv", "channel_mul": "channel_mul_conv"}
    expected_keys = (["conv_mask.weight", "conv_mask.bias"] if pooling_type == "att" else []) + [
        f"{parts[f]}.{i}.{kind}" for f in parts if f in fusion_types for i in (0, 1, 3) for kind in ("weight", "bias")]
    assert list(module.state_dict()) == expected_keys
    # mmcv's initialization: zero last convs, a zero conv_mask bias.
    for f in fusion_types:
        last = getattr(module, parts[f])[3]
        assert not last.weight.any() and not last.bias.any()
    if pooling_type == "att":
        assert module.conv_mask.weight.any() and not module.conv_mask.bias.any()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    state = {k: v.detach().clone().requires_grad_() for k, v in module.state_dict().items()}
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    check_against_rewrite(module, x, lambda x: mmcv_semantics(x, state, pooling_type, fusion_types), state)


# ---- dispatch, empty batches and bad input --------------------------------------------------

@pytest.mark.parametrize("config", ["att+scale+add", "avg+scale", "att+add"])
def test_empty_batch(config):
    check_empty_batch(pair(8, config)[1], 8)


@pytest.mark.parametrize("pooling_type", ["att", "avg"])
def test_empty_batch_mmcv_layout(pooling_type):
    check_empty_batch(attn_kernels.FusedContextBlock(8, 1 / 4, pooling_type, ("channel_add", "channel_mul")), 8)


@pytest.mark.cpu_kernels
def test_dispatch_falls_back_with_a_reason():
    with attn_kernels.use_backend("triton"):
        wide = attn_kernels.FusedGC(4104)
        choice = wide.dispatch(torch.randn(1, 4104, 2, 2))
        assert choice.backend == "reference" and "at most 4096" in choice.passed_over["triton"]
        assert attn_kernels.FusedGC(4104, use_attn=False).dispatch(torch.randn(1, 4104, 2, 2)).backend == "triton"
        eager, nothing = make_pair("gc", 8, fuse_scale=False)
        x = make_x((2, 8, 3, 3))
        choice = nothing.dispatch(x)
        assert choice.backend == "reference" and "nothing to fuse" in choice.passed_over["triton"]
        assert torch.equal(nothing(x), eager(x))
        _, mish = make_pair("gc", 8, act_layer=nn.Mish)
        assert "Mish" in mish.dispatch(x).passed_over["triton"]


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8, 4, 4)
    module = attn_kernels.FusedGC(8, rd_ratio=0.25, fuse_add=True)
    weights = module._arguments()["scale_weights"]
    with pytest.raises(ValueError, match="attn_weight must have shape \\(1, 8, 1, 1\\)"):
        F.gc(x, torch.randn(1, 6, 1, 1), None, weights, None)
    with pytest.raises(ValueError, match="scale_weights must hold the 6 tensors"):
        F.gc(x, None, None, weights[:5], None)
    with pytest.raises(ValueError, match="add_weights\\[0\\] \\(fc1_weight\\) must be a \\(rd_channels, 8, 1, 1\\)"):
        F.gc(x, None, None, None, [torch.randn(2, 6, 1, 1)] + weights[1:])
    with pytest.raises(ValueError, match="scale_weights\\[5\\] \\(fc2_bias\\) must have shape \\(8,\\)"):
        F.gc(x, None, None, weights[:5] + [torch.randn(3)], None)
    with pytest.raises(ValueError, match="x must be 4-D"):
        module(torch.randn(8, 4, 4))
    module.mlp_add.act = nn.SiLU()
    with pytest.raises(ValueError, match="mlp_scale.act \\(ReLU\\) and mlp_add.act \\(SiLU\\) differ"):
        module(x)
    with pytest.raises(ValueError, match="fusion_types must be a non-empty list"):
        attn_kernels.FusedContextBlock(8, 1 / 4, fusion_types=())
    with pytest.raises(ValueError, match="pooling_type must be 'avg' or 'att'"):
        attn_kernels.FusedContextBlock(8, 1 / 4, pooling_type="max")
