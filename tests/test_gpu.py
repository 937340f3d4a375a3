"""Both kernel backends on a CUDA GPU at real shapes: every dtype and layout against the float64
reference with outputs poisoned, determinism, memory saved for backward, 64-bit indexing.
Skipped (never passed) where there is no GPU."""
import pytest
import torch

import attn_kernels
from attn_kernels.ops.channel_gate import primitives
import test_patch
from helpers import check_kernel_against_reference, make_pair, make_x, run

pytestmark = pytest.mark.gpu

BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
# ResNet-50 stages at batch 8, an EfficientNet-like SE site, and odd sizes.
SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14), (8, 2048, 7, 7), (16, 96, 1, 1), (3, 100, 17, 23)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add_maxpool", [False, True], ids=["mean", "mean+max"])
def test_matches_reference(backend, dtype, layout, shape, add_maxpool, poisoned):
    x = make_x(shape, dtype, "cuda", layout, kind="relu" if add_maxpool else "normal")
    check_kernel_against_reference(backend, x, "se", {"add_maxpool": add_maxpool})


@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[5:], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", ["cbam", "spatial_attn", "channel_attn"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cbam_matches_reference(block, train, backend, dtype, layout, shape, poisoned):
    x = make_x(shape, dtype, "cuda", layout, kind="relu")
    check_kernel_against_reference(backend, x, block, train=train)


# ECA (plain, circular, use_mlp) and GC (timm's default; both fusions; mmcv's default add-only;
# mean pooling).
CHANNEL_BLOCKS = {
    "eca": ("eca", {}),
    "ceca": ("ceca", {}),
    "eca_mlp": ("eca", {"use_mlp": True}),
    "gc": ("gc", {}),
    "gc_scale_add": ("gc", {"fuse_add": True}),
    "gc_add": ("gc", {"fuse_add": True, "fuse_scale": False}),
    "gc_avg": ("gc", {"use_attn": False, "fuse_add": True}),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CHANNEL_BLOCKS)
def test_eca_gc_match_reference(config, backend, dtype, layout, shape, poisoned):
    block, kwargs = CHANNEL_BLOCKS[config]
    check_kernel_against_reference(backend, make_x(shape, dtype, "cuda", layout), block, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_deterministic(backend, layout, poisoned):
    x = make_x((8, 512, 28, 28), torch.bfloat16, "cuda", layout, kind="quantized")
    dy = make_x((8, 512, 28, 28), torch.bfloat16, "cuda", layout, seed=1)
    for block, kwargs in (("se", {"add_maxpool": True}), ("cbam", {}), ("eca", {}), ("gc", {"fuse_add": True})):
        _, fused = make_pair(block, 512, dtype=torch.bfloat16, device="cuda", **kwargs)
        first, second = run(fused, x, dy, backend), run(fused, x, dy, backend)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
        grads = [k for k in first[2] if "running" not in k]  # running statistics move on each step
        assert all(torch.equal(first[2][k], second[2][k]) for k in grads), block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", ["se", "cbam", "eca", "gc"])
def test_backward_keeps_no_activation_sized_intermediate(block, backend):
    """After forward, the graph holds y (the output) plus O(N*C + N*H*W): timm's eager blocks
    hold more (CBAM 2|x| besides y)."""
    x = make_x((32, 256, 56, 56), torch.bfloat16, "cuda", "channels_last").requires_grad_()
    _, fused = make_pair(block, 256, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with attn_kernels.use_backend(backend):
        y = fused(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    x_bytes = x.numel() * x.element_size()
    N, C, H, W = x.shape
    small = 8 * 4 * (N * C + N * H * W)  # generous room for float32 statistics per channel and pixel
    assert held <= x_bytes + small + 2**20, f"{held} bytes held for a {x_bytes}-byte output"
    del y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_more_than_2_to_the_31_elements(backend, layout):
    shape = (2, 64, 4096, 4100)  # 2,149,580,800 elements: offsets past 2^31 need 64-bit indexing
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    why = attn_kernels.backends.unavailable_reason(backend, torch.empty(1, 1, 1, 1, device="cuda"))
    if why:
        pytest.skip(why)
    ops = primitives(backend)
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.uniform_(-1, 1)
    x[-1, -1].fill_(0.5)  # the last plane, past 2^31, holds a known value and max
    mean, xmax = ops.channel_pool(x, True)
    torch.testing.assert_close(mean, x.mean((2, 3), dtype=torch.float32), rtol=1e-4, atol=1e-5)
    assert abs(mean[-1, -1].item() - 0.5) < 1e-6 and xmax[-1, -1].item() == 0.5
    gate = torch.full((2, 64), 2.0, device="cuda")
    y = ops.channel_gate_apply(x, gate, None, None, None, None)
    assert torch.equal(y[-1, -1], torch.full_like(y[-1, -1], 1.0))
    assert torch.equal(y[0, 0], x[0, 0] * 2)
    # Attention pooling with zero logits weighs every pixel alike: the context is the mean.
    weight, bias = torch.zeros(64, device="cuda"), torch.zeros(1, device="cuda")
    context, lse = ops.attention_pool(x, weight, bias)
    torch.testing.assert_close(context, mean, rtol=1e-4, atol=1e-5)
    assert abs(context[-1, -1].item() - 0.5) < 1e-5
    torch.testing.assert_close(lse, torch.full_like(lse, float(torch.tensor(4096.0 * 4100).log())))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_image_of_more_than_2_to_the_31_elements(backend):
    """The pixel-tile kernels (GC's attention pooling, scSE) in NCHW, where one image passes 2^31
    elements: channel c's plane starts at c * H*W, past 2^31 for the last channels."""
    shape = (1, 2050, 1024, 1024)  # 2,149,580,800 elements in one image
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    why = attn_kernels.backends.unavailable_reason(backend, torch.empty(1, 1, 1, 1, device="cuda"))
    if why:
        pytest.skip(why)
    ops = primitives(backend)
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda").uniform_(-1, 1)
    x[0, -1].fill_(0.5)  # the last plane, past 2^31
    sse_weight = torch.zeros(1, 2050, 1, 1, device="cuda")
    sse_weight[0, -1] = 1.0
    mlp = (torch.zeros(1, 2050, 1, 1, device="cuda"), None, torch.zeros(2050, 1, 1, 1, device="cuda"), None)
    _, mean, logits = ops.scse_pool_excite(x, *mlp, sse_weight, None)  # (gate or planes, mean, logits)
    assert mean[0, -1].item() == 0.5
    assert torch.equal(logits, torch.full_like(logits, 0.5))  # the last channel's plane alone
    context, _ = ops.attention_pool(x, torch.zeros(2050, device="cuda"), torch.zeros(1, device="cuda"))
    assert abs(context[0, -1].item() - 0.5) < 1e-6


def test_statistics_on_another_device_are_refused():
    """The CUDA primitives check that each statistic lies on x's device, naming it: a pointer of
    another device would be read as if it were x's (a CPU tensor stands in for another GPU)."""
    ops = primitives("cuda")
    x = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"argument 'gate' must be .* on x's device cuda:0, got .* on cpu"):
        ops.channel_gate_apply(x, torch.ones(2, 3), None, None, None, None)
    with pytest.raises(RuntimeError, match=r"argument 'sa' must be .* on x's device cuda:0, got .* on cpu"):
        ops.spatial_gate_apply(x, None, torch.ones(2, 16), None, None, None, None, None, None, None)
    with pytest.raises(RuntimeError, match=r"argument 'lse' must be .* on x's device cuda:0, got .* on cpu"):
        ctx = torch.zeros(2, 3, device="cuda")
        w, b = torch.zeros(3, device="cuda"), torch.zeros(1, device="cuda")
        ops.attention_pool_backward(x, x, None, ctx, ctx, w, b, torch.zeros(2))


# ---- whole timm models, patched (tests/test_patch.py has the CPU versions and the helpers) -------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", test_patch.MODELS)
def test_timm_model_patched_autocast_channels_last(name, train, dtype, backend):
    test_patch.check_model(name, train, dtype, "channels_last", backend=backend, device="cuda", size=128)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", test_patch.MODELS)
def test_timm_model_patched_float32(name, backend):
    test_patch.check_model(name, True, torch.float32, "nchw", backend=backend, device="cuda", size=128)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", test_patch.MODELS)
def test_timm_model_patched_compiles_without_graph_break(name, backend):
    """Inductor with fullgraph=True, bf16 autocast, channels_last, one training step."""
    test_patch.check_model(name, True, torch.bfloat16, "channels_last", backend=backend, device="cuda", size=64,
                           compile=True)


# ---- the other attention systems: SK, SAM / Residual Attention, attention transfer, non-local ----

import test_non_local  # noqa: E402
import test_selective_kernel  # noqa: E402
import test_sigmoid_gate  # noqa: E402
from helpers import assert_close_to_reference  # noqa: E402

SYSTEM_SHAPES = [(8, 256, 56, 56), (8, 1024, 14, 14), (8, 2048, 7, 7), (3, 100, 17, 23)]


@pytest.mark.parametrize("shape", SYSTEM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_selective_kernel_matches_reference(train, dtype, layout, shape, poisoned):
    kwargs = {"in_channels": shape[1], "kernel_size": [3, 5, 7] if shape[1] == 100 else None, "split_input": shape[1] != 100}
    eager64, _ = test_selective_kernel.pair(kwargs, train=train)
    eager, fused = test_selective_kernel.pair(kwargs, dtype=dtype, train=train)
    eager64, eager, fused = eager64.cuda(), eager.cuda(), fused.cuda()
    x = make_x(shape, dtype, "cuda", layout, kind="relu")
    dy = make_x(shape, dtype, "cuda", layout, seed=1)
    with attn_kernels.use_backend("triton"):
        assert fused.dispatch(x).backend == "triton"
    ref = test_selective_kernel.step(eager64, x.double(), dy.double())
    e, k = test_selective_kernel.step(eager, x, dy), test_selective_kernel.step(fused, x, dy, "triton")
    for name, got, eager_out, reference_out in [("y", k[0], e[0], ref[0]), ("dx", k[1], e[1], ref[1])] + \
            [(n, k[2][n], e[2][n], ref[2][n]) for n in ref[2]]:
        assert_close_to_reference(name, got, eager_out, reference_out)


@pytest.mark.parametrize("shape", SYSTEM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", test_sigmoid_gate.FORMS, ids=test_sigmoid_gate.FORM_IDS)
def test_sigmoid_gate_matches_reference(form, backend, dtype, layout, shape, poisoned):
    spatial, residual = form
    if backend == "cuda" and not spatial:
        pytest.skip("the point-wise gate has Triton's kernel only")
    x, logits = test_sigmoid_gate.inputs(shape, spatial, dtype, layout)
    x, logits = x.cuda(), logits.cuda()
    dy = make_x(shape, dtype, "cuda", layout, seed=1)
    with attn_kernels.use_backend(backend):
        assert attn_kernels.functional.sigmoid_gate_dispatch(x, logits).backend == backend
    step = test_sigmoid_gate.gate_step
    ref = step(x.double(), logits.double(), dy.double(), residual, "reference")
    eager, got = step(x, logits, dy, residual, "reference"), step(x, logits, dy, residual, backend)
    for name, g, e, r in zip(["y", "dx", "dlogits"], got, eager, ref):
        assert_close_to_reference(name, g, e, r)


@pytest.mark.parametrize("shape", SYSTEM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [2, 3])
def test_attention_transfer_matches_reference(p, dtype, layout, shape, poisoned):
    from attn_kernels import reference

    # Aligning the sizes runs adaptive_avg_pool2d, whose CUDA backward has no deterministic
    # implementation (in every path alike: reference, eager and kernel); warn_only keeps the
    # poisoning of fresh allocations.
    torch.use_deterministic_algorithms(True, warn_only=True)
    student = make_x(shape, dtype, "cuda", layout)
    teacher = make_x((shape[0], shape[1] // 2, shape[2] // 2 or 1, shape[3] // 2 or 1), dtype, "cuda", layout, seed=1)

    def loss_and_grad(fn, s, t):
        s = s.detach().clone().requires_grad_()
        loss = fn(s, t, p)
        return loss.detach(), torch.autograd.grad(loss, s)[0]

    ref = loss_and_grad(reference.at_loss, student.double(), teacher.double())
    eager = loss_and_grad(reference.at_loss, student, teacher)
    with attn_kernels.use_backend("triton"):
        got = loss_and_grad(attn_kernels.at_loss, student, teacher)
    for name, g, e, r in zip(["loss", "dstudent"], got, eager, ref):
        assert_close_to_reference(name, g, e, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_local_at_56x56_matches_timm_without_the_matrix(dtype):
    eager64, _ = test_non_local.timm_pair(256)
    eager, fused = test_non_local.timm_pair(256, dtype)
    eager64, eager, fused = eager64.cuda(), eager.cuda(), fused.cuda()
    x = make_x((4, 256, 56, 56), dtype, "cuda", "channels_last")
    dy = make_x((4, 256, 56, 56), dtype, "cuda", "channels_last", seed=1)
    grads = test_non_local.grads
    ref = grads(eager64, eager64, x.double(), dy.double())
    e = grads(eager, eager, x, dy)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    k = grads(fused, fused, x, dy)
    peak = torch.cuda.max_memory_allocated() - before
    matrix = 4 * (56 * 56) ** 2 * x.element_size()
    assert peak < matrix, f"peak {peak / 1e6:.0f} MB >= one attention matrix {matrix / 1e6:.0f} MB"
    for name, got, eager_out, reference_out in zip(["y", "dx"] + [n for n, _ in eager.named_parameters()], k, e, ref):
        assert_close_to_reference(name, got, eager_out, reference_out)


@pytest.mark.parametrize("shape", SYSTEM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scse_matches_reference(backend, dtype, layout, shape, poisoned):
    import test_scse

    x = make_x(shape, dtype, "cuda", layout)
    ws = [w.cuda() for w in test_scse.weights(shape[1], dtype=dtype)]
    dy = make_x(shape, dtype, "cuda", layout, seed=1)
    with attn_kernels.use_backend(backend):
        assert attn_kernels.functional.scse_dispatch(x).backend == backend
    step = test_scse.scse_step
    ref = step(x.double(), [w.double() for w in ws], dy.double(), "reference")
    eager, got = step(x, ws, dy, "reference"), step(x, ws, dy, backend)
    for name, g, e, r in zip(["y", "dx", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "sse_weight", "sse_bias"],
                             got, eager, ref):
        assert_close_to_reference(name, g, e, r)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dx", "deterministic-dx"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deform_conv_matches_torchvision_at_a_resnet_shape(dtype, layout, deterministic):
    """A 3x3 DCNv2 at 64 channels and 28x28, two offset groups: output and the five gradients
    against float64, within twice the error of torchvision's CUDA op at the dtype (the reference's
    in bfloat16, which torchvision's op does not take)."""
    import test_deform_conv
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    tensors, conv = test_deform_conv.make_case(N=4, C=64, H=28, W=28, O=64, offset_groups=2, layout=layout)
    tensors = [t.cuda() for t in tensors]
    dy = torch.randn((4, 64, 28, 28), dtype=torch.float64, device="cuda")
    step = test_deform_conv.step
    ref = step(tv_deform_conv2d, tensors, conv, dy)
    low = [t.to(dtype) for t in tensors]
    eager_fn = attn_kernels.reference.deform_conv2d if dtype == torch.bfloat16 else tv_deform_conv2d
    eager = step(eager_fn, low, conv, dy.to(dtype))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)  # the kernel's dx: gathered, or scattered by atomics
    try:
        got = step(test_deform_conv.kernel_fn, low, conv, dy.to(dtype))
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, g, e, r in zip(test_deform_conv.NAMES, got, eager, ref):
        assert_close_to_reference(name, g, e, r)


def test_deform_conv_allocates_nothing_column_sized():
    """Forward and backward of a 3x3 DCNv2 at 256 channels and 56x56 (N = 8, bf16): the peak memory
    above the inputs stays below one image's im2col columns (C*9*H*W elements), which
    torchvision's op allocates."""
    import test_deform_conv

    tensors, conv = test_deform_conv.make_case(N=8, C=256, H=56, W=56, O=256, layout="channels_last")
    x, offset, weight, bias, mask = [t.cuda().bfloat16().requires_grad_() for t in tensors]
    dy = torch.randn((8, 256, 56, 56), device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with attn_kernels.use_backend("triton"):
        out = attn_kernels.functional.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    out.backward(dy)
    peak = torch.cuda.max_memory_allocated() - before
    columns = 256 * 9 * 56 * 56 * x.element_size()
    # out, dx (and its float32 accumulator), d offset, d mask, d weight (and its float32 partial
    # sums): allowed; half of one image's columns more: not.
    allowed = out.numel() * 2 + x.numel() * (2 + 4) + 3 * offset.numel() * 2 + weight.numel() * (2 + 4 + 4)
    assert peak < allowed + columns // 2, f"peak {peak / 1e6:.1f} MB: a columns-sized buffer ({columns / 1e6:.1f} MB)?"
