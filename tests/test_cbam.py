"""CBAM and its parts (ChannelAttn, SpatialAttn): reference vs timm, kernels vs reference,
BatchNorm in train and eval, tied maxima, gradients, the op contract, bad input.

Kernel tests run the 'triton' backend in Triton's interpreter on CPU where there is no GPU; the
GPU tier (test_gpu.py) runs both backends at real shapes.
"""
import pytest
import torch

import attn_kernels
from attn_kernels import functional as F
from attn_kernels.ops.cbam import cbam_backward, cbam_forward
from helpers import (
    FAST_GRADCHECK, block_args, check_against_rewrite, check_compiles_without_graph_break,
    check_kernel_against_reference, make_pair, make_x, run, saved_for_backward,
)

BLOCKS = ["channel_attn", "spatial_attn", "cbam"]
LAYOUTS = ["nchw", "channels_last"]
interpreted_only = pytest.mark.skipif(torch.cuda.is_available(), reason="covered at real shapes by the GPU tests")

# (description, shape, x kind): small shapes for the interpreter; ties in both maxima.
SAMPLES = [
    ("odd sizes", (2, 13, 5, 7), "normal"),
    ("H*W = 1", (3, 16, 1, 1), "normal"),
    ("post-ReLU ties", (2, 12, 6, 5), "relu"),
    ("quantized ties", (2, 10, 4, 4), "quantized"),
    ("zero planes", (2, 9, 3, 5), "zero_planes"),
]


def pair(block, channels, **kwargs):
    kwargs = {"rd_ratio": 0.25, **kwargs} if block != "spatial_attn" else kwargs
    return make_pair(block, *block_args(block, channels), **kwargs)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("block", BLOCKS)
def test_reference_backend_matches_timm_bitwise(block, train):
    eager, fused = pair(block, 16, train=train)
    x = make_x((2, 16, 5, 6), kind="relu")
    dy = make_x((2, 16, 5, 6), seed=1)
    y_e, dx_e, s_e = run(eager, x, dy)
    y_f, dx_f, s_f = run(fused, x, dy, backend="reference")
    assert torch.equal(y_e, y_f) and torch.equal(dx_e, dx_f)
    assert s_e.keys() == s_f.keys()
    for name in s_e:
        assert torch.equal(s_e[name], s_f[name]), name
    assert torch.equal(dict(eager.named_buffers()).get("spatial.conv.bn.num_batches_tracked", torch.zeros(())),
                       dict(fused.named_buffers()).get("spatial.conv.bn.num_batches_tracked", torch.zeros(())))


@pytest.mark.parametrize(
    "block, kwargs",
    [("cbam", {}), ("cbam", {"rd_channels": 3, "spatial_kernel_size": 3, "mlp_bias": True}),
     ("channel_attn", {"rd_divisor": 4}), ("spatial_attn", {"kernel_size": 5})],
    ids=str,
)
def test_state_dict_loads_both_ways(block, kwargs):
    eager, fused = make_pair(block, *block_args(block, 32), **kwargs)
    assert list(eager.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(fused.state_dict(), strict=True)


@interpreted_only
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s[0])
@pytest.mark.parametrize("block", BLOCKS)
def test_kernel_matches_reference(block, sample, layout, train, poisoned, cpu_kernel_backend):
    _, shape, kind = sample
    check_kernel_against_reference(cpu_kernel_backend, make_x(shape, layout=layout, kind=kind), block, train=train)


@interpreted_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_kernel_dtypes(dtype, poisoned, cpu_kernel_backend):
    for layout in LAYOUTS:
        check_kernel_against_reference(cpu_kernel_backend, make_x((2, 24, 5, 7), dtype, layout=layout, kind="relu"), "cbam",
                                       {"rd_ratio": 0.25})


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channel", [True, False], ids=["cbam", "spatial"])
def test_gradcheck_float64(channel, train, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dd = {"dtype": torch.float64, "device": device}
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 5, **dd)
    mlp = [torch.randn(3, 6, 1, 1, **dd), torch.randn(3, **dd), torch.randn(6, 3, 1, 1, **dd), torch.randn(6, **dd)]
    conv, bn_w, bn_b = torch.randn(1, 2, 3, 3, **dd), torch.rand(1, **dd) + 0.5, torch.randn(1, **dd)
    stats = [torch.randn(1, **dd), torch.rand(1, **dd) + 0.5]
    inputs = [t.requires_grad_() for t in [x, *(mlp if channel else []), conv, bn_w, bn_b]]

    def f(x, *params):
        fc = params[:4] if channel else (None,) * 4
        conv, bn_w, bn_b = params[-3:]
        # Fresh running statistics per call: gradcheck evaluates f many times.
        rm, rv = stats[0].clone(), stats[1].clone()
        return F.cbam(x, *fc, conv, rm, rv, bn_w, bn_b, bn_training=train, act="silu")

    with attn_kernels.use_backend(kernel_backend):
        assert F.cbam_dispatch(x, conv, *stats, bn_w, bn_b, bn_training=train).backend == kernel_backend
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=FAST_GRADCHECK)


def op_args(backend, channel, train, device):
    torch.manual_seed(0)
    x = make_x((2, 8, 3, 5), device=device, kind="quantized")
    fc = [torch.randn(4, 8, 1, 1, device=device), None, torch.randn(8, 4, 1, 1, device=device), None]
    spatial = [torch.randn(1, 2, 3, 3, device=device), torch.rand(1, device=device) + 0.5,
               torch.randn(1, device=device), torch.randn(1, device=device), torch.rand(1, device=device) + 0.5]
    return x, (fc if channel else [None] * 4), spatial, (train, 1e-5, "", "avg+max", "relu", "sigmoid", backend)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channel", [True, False], ids=["cbam", "spatial"])
def test_opcheck(channel, train, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, fc, spatial, config = op_args(kernel_backend, channel, train, device)
    grads = [t.requires_grad_() if t is not None else None for t in [x, *fc, *spatial[:3]]]
    torch.library.opcheck(cbam_forward, (*grads, *spatial[3:], *config))
    # The backward op has no derivative of its own: detached inputs.
    plain = [t.detach() if t is not None else None for t in [x, *fc, *spatial]]
    _, *stats = cbam_forward(*plain, *config)
    dy = torch.randn_like(x)
    torch.library.opcheck(cbam_backward, (dy, *plain[:8], *stats, *config))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_spatial_reductions_split_over_channels(layout, kernel_backend, monkeypatch, poisoned):
    """The reductions over C split the channels across programs where the samples alone would
    leave the GPU idle (as at 2048x7x7), and fold the splits in order: mean, max and ties exact
    (quantized x: many ties), sums to rounding, in float64. Triton sizes its grid for an H100 here."""
    if torch.cuda.is_available():
        pytest.skip("interpreter and emulation test")
    monkeypatch.setenv("ATTN_KERNELS_INTERPRETER_SMS", "132")
    if kernel_backend == "cuda":
        from attn_kernels import _emulated  # noqa: F401

        ops = torch.ops.attn_kernels_emulated
    else:
        from attn_kernels.triton import spatial_gate as ops
    shape = (2, 300, 5, 6)  # two splits of C
    x = make_x(shape, torch.float64, layout=layout, kind="quantized")
    dy = make_x(shape, torch.float64, layout=layout, seed=2)
    ca = torch.rand(2, 300, dtype=torch.float64).round(decimals=1) + 0.5  # a few values: ties in u
    sa = torch.rand(2, 30, dtype=torch.float64)
    u = (x * ca[:, :, None, None]).flatten(2)
    mean, xmax, ties = ops.spatial_pool(x, ca)
    torch.testing.assert_close(mean, u.mean(1), rtol=0, atol=1e-13)
    assert torch.equal(xmax, u.amax(1))
    assert torch.equal(ties, (u == u.amax(1, keepdim=True)).sum(1).double())
    assert (ties > 1).any()
    dsa, dca = ops.spatial_grad_reduce(dy, x, ca, sa)
    torch.testing.assert_close(dsa, (dy.flatten(2) * u).sum(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(dca, (dy * x).flatten(2).mul(sa[:, None]).sum(2), rtol=0, atol=1e-12)


def test_compile_fullgraph_has_no_graph_break():
    model, reference_model = check_compiles_without_graph_break(pair("cbam", 16)[1], 16)
    # The compiled step updated the BN running statistics as eager does.
    for (name, b), (_, c) in zip(model.named_buffers(), reference_model.named_buffers()):
        torch.testing.assert_close(b, c, msg=name)


def test_saves_only_x_and_small_statistics(cpu_kernel_backend):
    """Backward keeps x plus O(N*C + N*H*W) tensors and the tiny weights: timm's CBAM keeps 2|x|."""
    x = make_x((2, 32, 8, 8)).requires_grad_()
    _, fused = pair("cbam", 32)
    saved = saved_for_backward(fused, x, cpu_kernel_backend)
    activation_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()
    params = sum(p.numel() for p in fused.parameters())
    N, C, H, W = x.shape
    # + 3: the BatchNorm's mean, variance and count
    assert sum(t.numel() for t in saved) <= x.numel() + params + 2 * N * C + 3 * N * H * W + 3


def test_deterministic_bitwise(cpu_kernel_backend):
    x = make_x((2, 24, 9, 7), kind="relu")
    dy = make_x((2, 24, 9, 7), seed=3)
    _, fused = pair("cbam", 24)
    first, second = run(fused, x, dy, cpu_kernel_backend), run(fused, x, dy, cpu_kernel_backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    grads = [k for k in first[2] if "running" not in k]  # running statistics move on each step
    assert all(torch.equal(first[2][k], second[2][k]) for k in grads)


@pytest.mark.cpu_kernels
def test_dispatch_falls_back_with_a_reason():
    x = make_x((2, 8, 4, 4))
    eager, fused = pair("cbam", 8)
    with attn_kernels.use_backend("triton"):
        assert fused.dispatch(x).backend == "triton"
        for module in (eager, fused):  # a BatchNorm without affine parameters
            module.spatial.conv.bn.weight = module.spatial.conv.bn.bias = None
        choice = fused.dispatch(x)
        assert choice.backend == "reference" and "without affine" in choice.passed_over["triton"]
        torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=0)
        single = make_x((1, 8, 1, 1))
        spatial = pair("spatial_attn", 8)[1]
        assert "more than one value" in spatial.dispatch(single).passed_over["triton"]
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            spatial(single)


def test_eval_without_running_statistics_uses_batch_statistics(cpu_kernel_backend):
    """As nn.BatchNorm2d: in eval with no running statistics, normalize with the batch's."""
    eager, fused = pair("cbam", 8)
    for module in (eager, fused):
        bn = module.spatial.conv.bn
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
        module.eval()
    x = make_x((2, 8, 4, 5))
    dy = make_x((2, 8, 4, 5), seed=1)
    y_e, dx_e, _ = run(eager, x, dy)
    y_f, dx_f, _ = run(fused, x, dy, cpu_kernel_backend)
    torch.testing.assert_close(y_f, y_e)
    torch.testing.assert_close(dx_f, dx_e)


def test_different_gates_run_the_parts_apart(cpu_kernel_backend):
    eager, fused = pair("cbam", 8)
    fused.spatial.gate = eager.spatial.gate = torch.nn.Hardsigmoid()
    x = make_x((2, 8, 4, 5))
    dy = make_x((2, 8, 4, 5), seed=1)
    y_e, dx_e, _ = run(eager, x, dy)
    y_f, dx_f, _ = run(fused, x, dy, cpu_kernel_backend)
    torch.testing.assert_close(y_f, y_e)
    torch.testing.assert_close(dx_f, dx_e)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 8, 4, 4)
    conv = torch.randn(1, 2, 7, 7)
    bn = [torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1)]
    with pytest.raises(ValueError, match="conv_weight must be a \\(1, 2, k, k\\) tensor with odd k"):
        F.cbam(x, None, None, None, None, torch.randn(1, 2, 4, 4), *bn)
    with pytest.raises(ValueError, match="bn_weight must have shape \\(1,\\)"):
        F.cbam(x, None, None, None, None, conv, bn[0], bn[1], torch.ones(2), bn[3])
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.cbam(torch.randn(8, 4, 4), None, None, None, None, conv, *bn)
    with pytest.raises(ValueError, match="x has 8 channels but fc1_weight expects 6"):
        F.cbam(x, torch.randn(2, 6, 1, 1), None, torch.randn(6, 2, 1, 1), None, conv, *bn)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        attn_kernels.FusedSpatialAttn(kernel_size=4)


def official_semantics(x, state, pool_types, no_spatial, training, running_stats):
    """What the paper's official CBAM code computes, written out with torch.nn.functional from a
    state_dict in its layout (pools as avg_pool2d/max_pool2d over the whole map, a linear MLP with
    biases, spatial pooling in the order [max, mean], BatchNorm momentum 0.01)."""
    import torch.nn.functional as tf

    w1, b1 = state["ChannelGate.mlp.1.weight"], state["ChannelGate.mlp.1.bias"]
    w2, b2 = state["ChannelGate.mlp.3.weight"], state["ChannelGate.mlp.3.bias"]
    pooled = {"avg": tf.avg_pool2d(x, x.shape[2:]), "max": tf.max_pool2d(x, x.shape[2:])}
    logits = sum(tf.linear(tf.relu(tf.linear(pooled[t].flatten(1), w1, b1)), w2, b2) for t in pool_types)
    x = x * torch.sigmoid(logits)[:, :, None, None]
    if no_spatial:
        return x
    maps = torch.cat([x.max(1, keepdim=True)[0], x.mean(1, keepdim=True)], 1)
    z = tf.conv2d(maps, state["SpatialGate.spatial.conv.weight"], padding=3)
    z = tf.batch_norm(z, *running_stats, state["SpatialGate.spatial.bn.weight"], state["SpatialGate.spatial.bn.bias"],
                      training, 0.01, 1e-5)
    return x * torch.sigmoid(z)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool_types, no_spatial", [(["avg", "max"], False), (["avg"], False), (["max"], False),
                                                    (["avg", "max"], True)], ids=str)
def test_official_layout_matches_the_papers_code(pool_types, no_spatial, train):
    torch.manual_seed(0)
    module = attn_kernels.FusedCBAMOfficial(32, reduction_ratio=4, pool_types=pool_types, no_spatial=no_spatial)
    module = module.double().train(train)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    keys = {"ChannelGate.mlp.1.weight", "ChannelGate.mlp.1.bias", "ChannelGate.mlp.3.weight", "ChannelGate.mlp.3.bias"}
    if not no_spatial:
        keys |= {"SpatialGate.spatial.conv.weight"} | {f"SpatialGate.spatial.bn.{k}" for k in
                                                        ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
        module.SpatialGate.spatial.bn.running_var.fill_(1.5)
    assert set(module.state_dict()) == keys
    state = {k: v.clone() for k, v in module.state_dict().items()}
    params = {k: v.requires_grad_() for k, v in state.items() if v.is_floating_point() and "running" not in k}
    running = (state.get("SpatialGate.spatial.bn.running_mean"), state.get("SpatialGate.spatial.bn.running_var"))

    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)  # continuous values: no tied maxima
    check_against_rewrite(
        module, x, lambda x: official_semantics(x, {**state, **params}, pool_types, no_spatial, train, running), params
    )
    for name, b in module.named_buffers():
        if "running" in name:
            torch.testing.assert_close(b, state[name], rtol=1e-12, atol=1e-14, msg=name)


def test_official_layout_refuses_pools_without_kernels():
    with pytest.raises(ValueError, match="pool_types must hold 'avg' and/or 'max'"):
        attn_kernels.FusedCBAMOfficial(16, pool_types=["avg", "lse"])
