"""Selective Kernel: the drop-ins vs timm's SelectiveKernel and SelectiveKernelAttn, the fused
attention op (ops/selective_kernel.py) vs the reference, gradients, the op contract, bad input.

Kernel tests run the 'triton' backend (SK's only kernel backend) in Triton's interpreter on CPU
where there is no GPU; test_gpu.py runs it at real shapes.
"""
import copy

import pytest
import torch

import attn_kernels
from attn_kernels import functional as F
from attn_kernels.ops.selective_kernel import selective_kernel_backward, selective_kernel_forward
from helpers import FAST_GRADCHECK, assert_close_to_reference, make_x, randomized, timm_layers

LAYOUTS = ["nchw", "channels_last"]

# (description, constructor kwargs, x shape): small shapes for the interpreter.
SAMPLES = [
    ("default 3x3 + 5x5", {}, (3, 16, 5, 7)),
    ("three paths, stride 2", {"kernel_size": [3, 5, 7], "in_channels": 12, "out_channels": 24, "stride": 2}, (2, 12, 7, 6)),
    ("no split, H*W = 1", {"split_input": False}, (4, 16, 1, 1)),
    ("odd channels, one path", {"kernel_size": [3], "in_channels": 13, "out_channels": 13, "split_input": False,
                                "rd_channels": 5}, (2, 13, 4, 3)),
]


def pair(kwargs, dtype=torch.float64, train=True, seed=0):
    """timm's SelectiveKernel and the drop-in, with the same random parameters and statistics."""
    kwargs = dict(kwargs)
    in_channels = kwargs.pop("in_channels", 16)
    torch.manual_seed(seed)
    eager = randomized(timm_layers.SelectiveKernel(in_channels, **kwargs))
    fused = attn_kernels.FusedSelectiveKernel(in_channels, **kwargs)
    fused.load_state_dict(eager.state_dict(), strict=True)
    return eager.to(dtype).train(train), fused.to(dtype).train(train)


def output_shape(module, x):
    with torch.no_grad():
        return tuple(copy.deepcopy(module)(x).shape)


def step(module, x, dy, backend=None):
    """(y, dx, parameter gradients, buffers) of one forward and backward."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with attn_kernels.use_backend(backend or attn_kernels.get_backend()):
        y = module(x)
    y.backward(dy)
    grads = {n: p.grad for n, p in module.named_parameters()}
    grads.update({n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return y.detach(), x.grad, grads


def test_state_dict_and_construction_match_timm():
    for kwargs in [{}, {"kernel_size": [3, 5, 7], "rd_ratio": 1 / 8, "split_input": False}, {"keep_3x3": False, "out_channels": 32}]:
        eager, fused = timm_layers.SelectiveKernel(16, **kwargs), attn_kernels.FusedSelectiveKernel(16, **kwargs)
        assert [(k, v.shape) for k, v in eager.state_dict().items()] == \
            [(k, v.shape) for k, v in fused.state_dict().items()]
        assert repr(fused.paths) == repr(eager.paths)
    attn = attn_kernels.FusedSelectiveKernelAttn(32, 3, 16)
    assert list(attn.state_dict()) == list(timm_layers.selective_kernel.SelectiveKernelAttn(32, 3, 16).state_dict())
    assert "num_paths=3, attn_channels=16" in repr(attn)
    assert "num_paths=2" in repr(attn_kernels.FusedSelectiveKernel(16))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s[0])
def test_reference_backend_matches_timm(sample, train):
    _, kwargs, shape = sample
    eager, fused = pair(kwargs, train=train)
    x = make_x(shape, torch.float64)
    dy = make_x(output_shape(eager, x), torch.float64, seed=1)
    y_e, dx_e, g_e = step(eager, x, dy)
    y_f, dx_f, g_f = step(fused, x, dy, "reference")
    # Bitwise but for the BN step counter: the drop-in calls F.batch_norm itself.
    assert torch.equal(y_e, y_f) and torch.equal(dx_e, dx_f)
    for name in g_e:
        assert torch.equal(g_e[name], g_f[name]), name


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s[0])
def test_triton_interpreted_matches_reference_float64(sample, train, layout, poisoned):
    _, kwargs, shape = sample
    eager, fused = pair(kwargs, train=train)
    x = make_x(shape, torch.float64, layout=layout, kind="relu")
    dy = make_x(output_shape(eager, x), torch.float64, layout=layout, seed=1)
    y_e, dx_e, g_e = step(eager, x, dy)
    with attn_kernels.use_backend("triton"):
        assert fused.dispatch(x).backend == "triton"
    y_f, dx_f, g_f = step(fused, x, dy, "triton")
    torch.testing.assert_close(y_f, y_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_f, dx_e, rtol=1e-10, atol=1e-12)
    for name in g_e:
        torch.testing.assert_close(g_f[name], g_e[name], rtol=1e-10, atol=1e-12, msg=name)
    # The output keeps the paths' memory format (timm's stack and sum return NCHW).
    assert y_f.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_interpreted_low_precision_within_twice_eager_error(dtype, poisoned):
    """In training (eval-mode bf16 is GPU-only: the interpreter rounds to bf16 toward zero)."""
    kwargs, shape = {}, (4, 16, 6, 5)
    eager64, _ = pair(kwargs)
    eager, fused = pair(kwargs, dtype=dtype)
    x = make_x(shape, dtype, kind="relu")
    dy = make_x(shape, dtype, seed=1)
    ref = step(eager64, x.double(), dy.double())
    e = step(eager, x, dy)
    k = step(fused, x, dy, "triton")
    for name, out, eager_out, reference_out in [("y", k[0], e[0], ref[0]), ("dx", k[1], e[1], ref[1])] + \
            [(n, k[2][n], e[2][n], ref[2][n]) for n in ref[2]]:
        assert_close_to_reference(name, out, eager_out, reference_out)


def test_attention_module_matches_timm():
    torch.manual_seed(0)
    eager = timm_layers.selective_kernel.SelectiveKernelAttn(16, 3, 8).double()
    fused = attn_kernels.FusedSelectiveKernelAttn(16, 3, 8).double()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    y_e, y_f = eager(x), fused(x)
    torch.testing.assert_close(y_f, y_e, rtol=1e-12, atol=1e-14)
    dy = torch.randn_like(y_e)
    torch.testing.assert_close(torch.autograd.grad(y_f, x, dy)[0], torch.autograd.grad(y_e, x, dy)[0])
    with pytest.raises(ValueError, match=r"stacked paths \(B, 3, C, H, W\)"):
        fused(x[:, :2])


@pytest.mark.cpu_kernels
def test_many_splits_and_tiles(monkeypatch, poisoned):
    """path_grad_reduce split over H*W (summed in a fixed order) and C over several tiles."""
    from attn_kernels.triton import channel_gate

    monkeypatch.setattr(channel_gate, "TARGET_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(channel_gate, "_TILE_ELEMENTS", 64)
    test_triton_interpreted_matches_reference_float64(SAMPLES[0], True, "nchw", None)
    test_triton_interpreted_matches_reference_float64(SAMPLES[1], True, "channels_last", None)


def op_args(P=2, N=3, C=8, A=4):
    paths = [make_x((N, C, 5, 4), seed=i) for i in range(P)]
    weights = (torch.randn(A, C, 1, 1), torch.rand(A) + 0.5, torch.randn(A), torch.randn(A), torch.rand(A) + 0.5)
    return paths, weights, torch.randn(P * C, A, 1, 1)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    paths, (w1, bn_w, bn_b, rm, rv), w2 = op_args()
    args = ([p.requires_grad_() for p in paths], w1.requires_grad_(), bn_w.requires_grad_(), bn_b.requires_grad_(),
            rm, rv, training, 1e-5, "", w2.requires_grad_(), "relu")
    torch.library.opcheck(selective_kernel_forward, args)
    plain = [p.detach() for p in paths]
    _, s, *bn_stats = selective_kernel_forward(plain, w1.detach(), bn_w.detach(), bn_b.detach(), rm, rv, training,
                                               1e-5, "", w2.detach(), "relu")
    torch.library.opcheck(selective_kernel_backward, (torch.randn_like(plain[0]), plain, w1.detach(), bn_w.detach(),
                                                      bn_b.detach(), w2.detach(), s, *bn_stats, training, 1e-5, "",
                                                      "relu"))


def test_gradcheck_float64():
    paths, (w1, bn_w, bn_b, rm, rv), w2 = op_args(P=3, N=4, C=5, A=3)
    inputs = [p.double().requires_grad_() for p in paths] + [t.double().requires_grad_() for t in (w1, bn_w, bn_b, w2)]

    def fn(*t):
        with attn_kernels.use_backend("triton"):
            return F.selective_kernel(list(t[:3]), t[3], t[6], None, None, t[4], t[5], bn_training=True)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=FAST_GRADCHECK)


def test_compile_fullgraph_has_no_graph_break():
    _, fused = pair({}, dtype=torch.float32)
    x = make_x((2, 16, 6, 6))
    reference = copy.deepcopy(fused)
    torch._dynamo.reset()
    with attn_kernels.use_backend("triton"):
        y = torch.compile(fused, fullgraph=True, backend="aot_eager")(x.requires_grad_())
        y.sum().backward()
        torch.testing.assert_close(y, reference(x.detach()))


@pytest.mark.cpu_kernels
def test_saves_the_paths_and_small_statistics():
    """Backward keeps the paths (alive anyway: the branch activations save them) and O(N*C)
    tensors; timm also saves the stacked copy of the paths."""
    paths = [make_x((2, 16, 8, 8), seed=i).requires_grad_() for i in range(2)]
    w1, w2 = torch.randn(8, 16, 1, 1, requires_grad=True), torch.randn(32, 8, 1, 1, requires_grad=True)
    bn_w, bn_b = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    saved = []
    with attn_kernels.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        F.selective_kernel(paths, w1, w2, None, None, bn_w, bn_b, bn_training=True)
    big = [t for t in saved if t.numel() >= 2 * 16 * 8 * 8]
    assert len(big) == 2 and all(any(t is p for p in paths) for t in big)


def test_deterministic_bitwise():
    _, fused = pair({}, dtype=torch.float32)
    x, dy = make_x((2, 16, 6, 5)), make_x((2, 16, 6, 5), seed=1)
    first, second = step(fused, x, dy, "triton"), step(fused, x, dy, "triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_empty_batch():
    _, fused = pair({}, dtype=torch.float32, train=False)
    for backend in ["triton", "reference"]:
        x = torch.randn(0, 16, 4, 4, requires_grad=True)
        with attn_kernels.use_backend(backend):
            y = fused(x)
        assert y.shape == (0, 16, 4, 4)
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_dispatch_falls_back_with_a_reason():
    _, fused = pair({}, dtype=torch.float32)
    x = make_x((1, 16, 4, 4))
    with attn_kernels.use_backend("cuda"):
        d = fused.dispatch(x)
    assert "this block has no cuda kernel" in d.passed_over["cuda"]
    with attn_kernels.use_backend("triton"):
        assert "more than one value per channel" in d.__class__.__str__(fused.dispatch(x))
        with pytest.raises(ValueError, match="more than 1 value per channel"):  # as timm's BatchNorm
            fused(x)
    paths = [make_x((2, 16, 3, 3))] * 5
    with attn_kernels.use_backend("triton"):
        d = F.selective_kernel_dispatch(paths, torch.randn(8, 16), torch.randn(80, 8), None, None, torch.ones(8),
                                        torch.zeros(8), bn_training=True)
    assert d.backend == "reference" and "at most 4" in d.passed_over["triton"]


def test_bad_input_names_the_argument():
    paths = [make_x((2, 16, 3, 3)), make_x((2, 16, 3, 3))]
    w1, w2, bn = torch.randn(8, 16, 1, 1), torch.randn(32, 8, 1, 1), (None, None, torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"paths\[1\] must be a tensor of paths\[0\]'s shape"):
        F.selective_kernel([paths[0], make_x((2, 8, 3, 3))], w1, w2, *bn)
    with pytest.raises(ValueError, match="fc_reduce_weight must be"):
        F.selective_kernel(paths, torch.randn(8, 15, 1, 1), w2, *bn)
    with pytest.raises(ValueError, match="fc_select_weight must have shape"):
        F.selective_kernel(paths, w1, torch.randn(16, 8, 1, 1), *bn)
    with pytest.raises(TypeError, match="paths must be a non-empty list"):
        F.selective_kernel(paths[0], w1, w2, *bn)
    with pytest.raises(ValueError, match="in_channels"):
        attn_kernels.FusedSelectiveKernel(15)


def test_patched_attention_module_computes_what_it_did():
    torch.manual_seed(0)
    original = timm_layers.selective_kernel.SelectiveKernelAttn(16, 2, 8).double()
    patched = attn_kernels.patch(copy.deepcopy(original))
    assert type(patched).__name__ == "FusedSelectiveKernelAttn"
    x = torch.randn(3, 2, 16, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(patched(x), original(x), rtol=1e-12, atol=1e-14)
