"""Non-local blocks: the drop-ins for timm's NonLocalAttn and mmcv's NonLocal2d (embedded
Gaussian), whose attention runs through scaled_dot_product_attention, vs timm and vs a rewrite of
mmcv's forward (mmcv is not a test dependency); the HW x HW matrix is never saved for backward.
"""
import copy

import pytest
import torch

import attn_kernels
from attn_kernels import functional as F
from helpers import assert_close_to_reference, make_x, timm_layers

LAYOUTS = ["nchw", "channels_last"]


def timm_pair(channels=32, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    eager = timm_layers.NonLocalAttn(channels, **kwargs)
    with torch.no_grad():  # timm zero-initializes the BN: draw everything, or the block is the identity
        for p in eager.parameters():
            p.normal_(0, 0.3)
    fused = attn_kernels.FusedNonLocalAttn(channels, **kwargs)
    fused.load_state_dict(eager.state_dict(), strict=True)
    return eager.to(dtype), fused.to(dtype)


def mmcv_semantics(m, x):
    """mmcv's _NonLocalNd.forward in 'embedded_gaussian' mode, written out with m's submodules."""
    n, r = x.shape[0], m.inter_channels
    g_x = m.g(x).reshape(n, r, -1).permute(0, 2, 1)
    theta_x = m.theta(x).reshape(n, r, -1).permute(0, 2, 1)
    phi_x = m.phi(x).reshape(n, r, -1)
    pairwise = theta_x @ phi_x
    if m.use_scale:
        pairwise = pairwise / theta_x.shape[-1] ** 0.5
    y = (pairwise.softmax(dim=-1) @ g_x).permute(0, 2, 1).reshape(n, r, *x.shape[2:])
    return x + m.conv_out(y)


def grads(module, fn, x, dy):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = fn(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,kwargs", [((2, 32, 5, 7), {}), ((3, 24, 1, 9), {"use_scale": False}),
                                          ((2, 16, 4, 4), {"rd_channels": 6})], ids=str)
def test_timm_drop_in_matches_timm_float64(shape, kwargs, layout):
    eager, fused = timm_pair(shape[1], **kwargs)
    x, dy = make_x(shape, torch.float64, layout=layout), make_x(shape, torch.float64, layout=layout, seed=1)
    assert list(eager.state_dict()) == list(fused.state_dict())
    expected = grads(eager, eager, x, dy)
    with attn_kernels.use_backend("reference"):
        assert fused.dispatch(x).backend == "reference"
        for e, g in zip(expected, grads(fused, fused, x, dy)):
            assert torch.equal(e, g)  # the reference is timm's computation, op for op
    assert fused.dispatch(x).backend == "sdpa"
    for e, g in zip(expected, grads(fused, fused, x, dy)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timm_drop_in_low_precision_within_twice_eager_error(dtype):
    eager64, _ = timm_pair(32)
    eager, fused = timm_pair(32, dtype)
    x, dy = make_x((2, 32, 6, 6), dtype), make_x((2, 32, 6, 6), dtype, seed=1)
    ref = grads(eager64, eager64, x.double(), dy.double())
    for name, g, e, r in zip(["y", "dx"] + [n for n, _ in eager.named_parameters()],
                             grads(fused, fused, x, dy), grads(eager, eager, x, dy), ref):
        assert_close_to_reference(name, g, e, r)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", [{}, {"sub_sample": True}, {"norm_cfg": {"type": "BN"}, "use_scale": False},
                                    {"norm_cfg": {"type": "GN", "num_groups": 4}, "zeros_init": False}], ids=str)
def test_mmcv_drop_in_matches_mmcv_semantics(kwargs, layout):
    torch.manual_seed(0)
    m = attn_kernels.FusedNonLocal2d(16, **kwargs).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x, dy = make_x((2, 16, 6, 4), torch.float64, layout=layout), make_x((2, 16, 6, 4), torch.float64, seed=1)
    expected = grads(m, lambda x: mmcv_semantics(m, x), x, dy)
    for e, g in zip(expected, grads(m, m, x, dy)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_mmcv_state_dict_keys_and_init():
    keys = list(attn_kernels.FusedNonLocal2d(8).state_dict())
    assert keys == ["g.conv.weight", "g.conv.bias", "conv_out.conv.weight", "conv_out.conv.bias",
                    "theta.conv.weight", "theta.conv.bias", "phi.conv.weight", "phi.conv.bias"]
    m = attn_kernels.FusedNonLocal2d(8, sub_sample=True, norm_cfg=dict(type="BN"))
    assert list(m.state_dict())[:3] == ["g.0.conv.weight", "g.0.conv.bias", "conv_out.conv.weight"]
    assert "phi.0.conv.weight" in m.state_dict() and m.conv_out.conv.bias is None
    assert torch.equal(m.conv_out.bn.weight, torch.zeros(8))  # zeros_init: the block starts as the identity
    x = make_x((1, 8, 4, 4))
    assert torch.equal(m(x), x)
    with pytest.raises(ValueError, match="mode must be 'embedded_gaussian'"):
        attn_kernels.FusedNonLocal2d(8, mode="dot_product")
    with pytest.raises(ValueError, match="norm_cfg type must be one of"):
        attn_kernels.FusedNonLocal2d(8, norm_cfg=dict(type="LN"))


def test_never_saves_the_attention_matrix():
    """The fused path saves nothing of H*W x H*W size; the reference saves the softmax."""
    _, fused = timm_pair(16, torch.float32)
    x = make_x((2, 16, 12, 12)).requires_grad_()
    hw2 = 2 * (12 * 12) ** 2

    def saved_sizes(backend):
        saved = []
        with attn_kernels.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            fused(x)
        return saved

    assert max(saved_sizes("auto")) < hw2
    assert max(saved_sizes("reference")) >= hw2


def test_compile_fullgraph_has_no_graph_break():
    _, fused = timm_pair(16, torch.float32)
    x = make_x((2, 16, 5, 5)).requires_grad_()
    torch._dynamo.reset()
    y = torch.compile(copy.deepcopy(fused), fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    torch.testing.assert_close(y, fused(x.detach()))


def test_empty_batch():
    _, fused = timm_pair(16, torch.float32)
    x = torch.randn(0, 16, 4, 4, requires_grad=True)
    fused.eval()(x).sum().backward()
    assert x.grad.shape == x.shape


def test_bad_input_names_the_argument():
    x = make_x((2, 8, 3, 3))
    w = torch.randn(4, 8, 1, 1)
    with pytest.raises(ValueError, match="theta_weight must be an"):
        F.non_local(x, torch.randn(4, 7, 1, 1), None, w, None, w, None, scale=1.0)
    with pytest.raises(ValueError, match="phi_weight must have shape"):
        F.non_local(x, w, None, torch.randn(5, 8, 1, 1), None, w, None, scale=1.0)
    with pytest.raises(ValueError, match="g_bias must have shape"):
        F.non_local(x, w, None, w, None, w, torch.randn(3), scale=1.0)
