"""scSE (concurrent spatial and channel squeeze-and-excitation): the fused op (ops/scse.py) on both
kernel backends vs the reference, the reference vs segmentation_models_pytorch's SCSEModule, the
drop-in module, a patched smp U-Net, gradients, the op contract, bad input.

Kernel tests run on CPU tensors (Triton's interpreter, the CUDA emulation) where there is no GPU;
test_gpu.py runs both kernel backends at real shapes.
"""
import copy

import pytest
import torch
from torch import nn

import attn_kernels
from attn_kernels import functional as F
from attn_kernels import reference
from attn_kernels.ops.scse import scse_backward, scse_forward
from conftest import require_cpu_backend
from helpers import assert_close_to_reference, check_empty_batch, check_launch_budget, make_x
from patchable import SCSEModule

smp = pytest.importorskip("segmentation_models_pytorch")
from segmentation_models_pytorch.base.modules import SCSEModule as SmpSCSEModule  # noqa: E402

LAYOUTS = ["nchw", "channels_last"]
# Odd channel counts and pixel counts leave partial chunks and tiles; 40x40 splits H*W between
# programs (several per image) in both backends; 1x1 and C = 1 are the degenerate planes.
SHAPES = [(2, 13, 5, 7), (1, 8, 40, 40), (3, 70, 3, 3), (2, 4, 1, 1), (2, 1, 3, 2)]


def weights(channels, reduction=4, dtype=torch.float64, bias=True, seed=3):
    """(fc1_weight, fc1_bias, fc2_weight, fc2_bias, sse_weight, sse_bias) drawn at random."""
    g = torch.Generator().manual_seed(seed)
    hidden = max(1, channels // reduction)

    def draw(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    return (draw(hidden, channels, 1, 1), draw(hidden) if bias else None, draw(channels, hidden, 1, 1),
            draw(channels) if bias else None, draw(1, channels, 1, 1), draw(1) if bias else None)


def scse_step(x, ws, dy, backend):
    """(y, dx, and each given weight's gradient) of one forward and backward of F.scse."""
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() if w is not None else None for w in ws]
    with attn_kernels.use_backend(backend):
        y = F.scse(x, *ws)
    y.backward(dy)
    return [y.detach(), x.grad] + [w.grad for w in ws if w is not None]


def test_reference_is_smp_scse_module():
    torch.manual_seed(0)
    smp_module = SmpSCSEModule(16, reduction=4).double()
    x = make_x((2, 16, 5, 6), torch.float64)
    ws = [smp_module.cSE[1].weight, smp_module.cSE[1].bias, smp_module.cSE[3].weight, smp_module.cSE[3].bias,
          smp_module.sSE[0].weight, smp_module.sSE[0].bias]
    torch.testing.assert_close(reference.scse(x, *ws), smp_module(x), rtol=0, atol=0)
    # and the paper's formula, written out
    gc = torch.sigmoid(torch.relu(x.mean((2, 3)) @ ws[0][:, :, 0, 0].t() + ws[1]) @ ws[2][:, :, 0, 0].t() + ws[3])
    gs = torch.sigmoid((x * ws[4]).sum(1, keepdim=True) + ws[5])
    torch.testing.assert_close(reference.scse(x, *ws), x * gc[:, :, None, None] + x * gs, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference_float64(shape, layout, bias, poisoned, cpu_kernel_backend):
    x = make_x(shape, torch.float64, layout=layout)
    ws = weights(shape[1], bias=bias)
    dy = make_x(shape, torch.float64, layout=layout, seed=1)
    with attn_kernels.use_backend(cpu_kernel_backend):
        assert F.scse_dispatch(x).backend == cpu_kernel_backend
    expected = scse_step(x, ws, dy, "reference")
    got = scse_step(x, ws, dy, cpu_kernel_backend)
    for name, e, g in zip(["y", "dx", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "sse_weight", "sse_bias"]
                          if bias else ["y", "dx", "fc1_weight", "fc2_weight", "sse_weight"], expected, got):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12, msg=name)
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride()  # no hidden layout change
    # the per-sample counters are left at zero for the next launch
    if cpu_kernel_backend == "triton":
        from attn_kernels.triton import excite

        assert not excite._tickets[x.device].any()
    else:
        assert not torch.ops.attn_kernels_emulated._sample_tickets().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_low_precision_within_twice_eager_error(dtype, layout, poisoned, cpu_kernel_backend):
    shape = (2, 24, 6, 5)
    x = make_x(shape, dtype, layout=layout)
    ws = weights(24, dtype=dtype)
    dy = make_x(shape, dtype, layout=layout, seed=1)
    ref = scse_step(x.double(), [w.double() for w in ws], dy.double(), "reference")
    eager = scse_step(x, ws, dy, "reference")
    got = scse_step(x, ws, dy, cpu_kernel_backend)
    for name, g, e, r in zip(["y", "dx", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "sse_weight", "sse_bias"],
                             got, eager, ref):
        assert_close_to_reference(name, g, e, r)


def test_kernels_are_deterministic(cpu_kernel_backend):
    x = make_x((2, 8, 40, 40), torch.float32)
    ws = weights(8, dtype=torch.float32)
    dy = make_x(tuple(x.shape), torch.float32, seed=1)
    first, second = scse_step(x, ws, dy, cpu_kernel_backend), scse_step(x, ws, dy, cpu_kernel_backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.cpu_kernels
def test_module_is_a_drop_in_for_smp():
    torch.manual_seed(0)
    original = SmpSCSEModule(32, reduction=8).double()
    fused = attn_kernels.FusedSCSE(32, reduction=8).double()
    assert list(fused.state_dict()) == list(original.state_dict()) == [
        "cSE.1.weight", "cSE.1.bias", "cSE.3.weight", "cSE.3.bias", "sSE.0.weight", "sSE.0.bias"]
    fused.load_state_dict(original.state_dict())
    x = make_x((2, 32, 6, 5), torch.float64)
    dy = make_x(tuple(x.shape), torch.float64, seed=1)
    for backend in ("triton", "cuda"):
        if attn_kernels.backends.unavailable_reason(backend, x) is not None:
            continue
        with attn_kernels.use_backend(backend):
            assert fused.dispatch(x).backend == backend
        expected, got = [], []
        for module, out, be in ((original, expected, "reference"), (fused, got, backend)):
            module.zero_grad(set_to_none=True)
            xs = x.clone().requires_grad_()
            with attn_kernels.use_backend(be):
                y = module(xs)
            y.backward(dy)
            out += [y, xs.grad] + [p.grad for p in module.parameters()]
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12)
    assert "in_channels=32, rd_channels=4" in repr(fused)
    with pytest.raises(ValueError, match="reduction must be an int from 1 to in_channels"):
        attn_kernels.FusedSCSE(8, reduction=16)


def _unet(seed=0):
    torch.manual_seed(seed)
    model = smp.Unet("resnet18", encoder_weights=None, decoder_attention_type="scse", classes=2)
    # Random BN statistics and affine parameters, so no layer is an identity that hides an error.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


@pytest.mark.cpu_kernels
def test_patched_smp_unet_computes_what_it_did():
    """smp's U-Net with scSE decoder blocks (10 SCSEModules), patched on the Triton backend vs
    unpatched, float64: output and every parameter's gradient."""
    original = _unet()
    patched = attn_kernels.patch(copy.deepcopy(original))
    report = attn_kernels.patch_report(patched)
    assert len(report.with_status("patched")) == 10, report
    assert all(type(m).__name__ == "FusedSCSEModule" for m in patched.modules() if isinstance(m, SmpSCSEModule))
    x = make_x((1, 3, 32, 32), torch.float64)
    outputs = []
    for model, backend in ((original, "reference"), (patched, "triton")):
        xs = x.clone().requires_grad_()
        with attn_kernels.use_backend(backend):
            y = model(xs)
        y.square().sum().backward()
        outputs.append([y, xs.grad] + [p.grad for p in model.parameters()])
    for e, g in zip(*outputs):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_patch_leaves_a_changed_copy_alone():
    m = SCSEModule(16)
    m.cSE[2] = nn.GELU()
    report = attn_kernels.patch_report(nn.Sequential(m))
    assert report.entries[0].status == "left alone" and "cSE is not Sequential" in report.entries[0].detail
    m = SCSEModule(16)
    m.sSE[0] = nn.Conv2d(16, 1, 3, padding=1)
    assert "sSE is not Sequential(Conv2d(16, 1, 1), Sigmoid)" in attn_kernels.patch_report(nn.Sequential(m)).entries[0].detail


@pytest.mark.cpu_kernels
def test_opcheck(cpu_kernel_backend):
    # The ops have no derivative of their own (autograd is ops.scse.SCSE around them, which the
    # gradcheck test covers): inputs that do not require grad.
    x = make_x((2, 6, 4, 3), torch.float32)
    ws = weights(6, reduction=2, dtype=torch.float32)
    torch.library.opcheck(scse_forward, (x, *ws, cpu_kernel_backend))
    _, mean, logits = scse_forward(x, *ws, cpu_kernel_backend)
    torch.library.opcheck(scse_backward, (torch.randn_like(x), x, mean, logits, *ws, cpu_kernel_backend))


def test_gradcheck_float64(cpu_kernel_backend):
    x = make_x((2, 5, 3, 2), torch.float64)
    ws = [w.requires_grad_() for w in weights(5, reduction=2)]

    def fn(x, *ws):
        with attn_kernels.use_backend(cpu_kernel_backend):
            return F.scse(x, *ws)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *ws), fast_mode=True)


def test_compile_fullgraph_has_no_graph_break():
    scse = attn_kernels.FusedSCSE(8, reduction=2)
    x = make_x((2, 8, 5, 5))
    torch._dynamo.reset()
    with attn_kernels.use_backend("triton"):
        y = torch.compile(scse, fullgraph=True, backend="aot_eager")(x.requires_grad_())
        y.sum().backward()
        torch.testing.assert_close(y, scse.reference_forward(x.detach()))


@pytest.mark.cpu_kernels
def test_saves_x_and_per_channel_and_per_pixel_tensors_only(cpu_kernel_backend):
    """Besides x and the weights, only the (N, C) mean and the (N, H*W) logits: nothing of x's size."""
    x = make_x((2, 8, 6, 6)).requires_grad_()
    ws = [w.requires_grad_() for w in weights(8, dtype=torch.float32)]
    saved = []
    with attn_kernels.use_backend(cpu_kernel_backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        F.scse(x, *ws)
    assert saved[0] is x
    assert sorted(tuple(t.shape) for t in saved[1:3]) == [(2, 8), (2, 36)]
    assert all(any(t is w for w in ws) for t in saved[3:]) and len(saved) == 3 + len(ws)


def test_empty_batch():
    check_empty_batch(attn_kernels.FusedSCSE(8, reduction=2), 8)


def test_dispatch_falls_back_with_a_reason():
    x = torch.empty(1, 4097, 1, 1)
    with attn_kernels.use_backend("triton"):
        d = F.scse_dispatch(x)
    assert d.backend == "reference" and "at most 4096" in d.passed_over["triton"]


def test_bad_input_names_the_argument():
    x = make_x((2, 8, 3, 3))
    ws = list(weights(8, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"sse_weight must have shape \(1, 8, 1, 1\), got \(8,\)"):
        F.scse(x, *ws[:4], ws[4].reshape(8), ws[5])
    with pytest.raises(ValueError, match=r"sse_bias must have shape \(1,\)"):
        F.scse(x, *ws[:5], torch.zeros(2))
    with pytest.raises(ValueError, match="x has 8 channels but fc1_weight expects 16"):
        F.scse(x, torch.zeros(2, 16, 1, 1), *ws[1:])
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.scse(x[0], *ws)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_launch_budget_at_resnet50_shapes(backend):
    """Issue 26's budget for scSE: forward <= 2 launches, backward <= 3."""
    require_cpu_backend(backend)
    check_launch_budget(attn_kernels.FusedSCSE, backend, forward=2, backward=3)


def emulated_launches(fn):
    """(kernel name, grid x) of every CUDA-emulation launch fn() makes."""
    log = torch.ops.attn_kernels_emulated._launch_log
    log(True)
    try:
        fn()
    finally:
        lines = log(False).splitlines()
    return [(line.split("\t")[0].split("<")[0], int(line.split("\t")[1].split(",")[0])) for line in lines]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_last_block_of_many_per_sample(layout, poisoned):
    """CUDA (emulated): several blocks per sample (H*W splits), so the last block of each sample to
    take a ticket folds partials written by the others and runs cSE's MLP (forward) and its
    derivative (backward), and the apply's last block of the grid folds d sse_weight and d sse_bias;
    float64 against the reference with every weight gradient, and the counters left at zero."""
    require_cpu_backend("cuda")
    if torch.cuda.is_available():
        pytest.skip("emulation test")
    N, shape = 2, (2, 24, 23, 25)
    x = make_x(shape, torch.float64, layout=layout, kind="quantized")
    dy = make_x(shape, torch.float64, layout=layout, seed=1)
    ws = weights(shape[1])
    expected = scse_step(x, ws, dy, "reference")
    got = []
    launches = emulated_launches(lambda: got.extend(scse_step(x, ws, dy, "cuda")))
    grids = dict(launches)
    assert [name for name, _ in launches] == ["scse_pool_excite_kernel", "scse_apply_kernel",
                                              "scse_grad_excite_kernel", "mlp_weight_grad_kernel",
                                              "scse_apply_kernel"]
    assert grids["scse_pool_excite_kernel"] >= 4 * N and grids["scse_grad_excite_kernel"] >= 4 * N
    for name, e, g in zip(["y", "dx", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "sse_weight", "sse_bias"],
                          expected, got):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-12, msg=name)
    assert not torch.ops.attn_kernels_emulated._sample_tickets().any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [65535, 65536])
def test_cuda_at_the_grid_limit(N, layout, monkeypatch, poisoned):
    """scse_pool_excite, scse_grad_excite and scse_apply with one block per sample: N at and past
    65535, the limit of a grid's y and z dimensions (samples run along x, whose limit is 2^31 - 1).
    The launches are validated whole; only the first and last blocks run
    (ATTN_KERNELS_EMULATION_GRID=edges), and their samples are checked against the reference. The
    backward's apply is only validated (=none): its ticket counts the whole grid, which a partial
    run would leave unfinished; its blocks index x as the forward's apply does."""
    require_cpu_backend("cuda")
    if torch.cuda.is_available():
        pytest.skip("emulation test")
    ops = torch.ops.attn_kernels_emulated
    monkeypatch.setenv("ATTN_KERNELS_EMULATION_GRID", "edges")
    edges = [0, 1, N - 2, N - 1]
    x = make_x((N, 2, 1, 2), torch.float64, layout=layout, kind="quantized")
    dy = make_x((N, 2, 1, 2), torch.float64, layout=layout, seed=1)
    ws = weights(2, reduction=2)
    gate, mean, logits = ops.scse_pool_excite(x, *ws)
    y, _, _ = ops.scse_apply(x, gate, logits, None, None, None, None, None, None)
    x_edges = x[edges].detach().clone().requires_grad_()
    y_ref = reference.scse(x_edges, *ws)
    torch.testing.assert_close(y[edges], y_ref, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(mean[edges], x[edges].mean((2, 3)), rtol=0, atol=1e-15)
    logits_ref = (x[edges] * ws[4]).sum(1).reshape(4, -1) + ws[5]
    torch.testing.assert_close(logits[edges], logits_ref, rtol=1e-14, atol=1e-15)

    gate, cbias, dlogits, dlogit_sums, *_ = ops.scse_grad_excite(dy, x, mean, logits, *ws[:4])
    gs = logits_ref.sigmoid()
    dlogits_ref = (dy[edges] * x[edges]).sum(1).reshape(4, -1) * gs * (1 - gs)
    torch.testing.assert_close(dlogits[edges], dlogits_ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dlogit_sums[edges], dlogits[edges].sum(1), rtol=0, atol=0)
    # cbias = d mean / HW: x's gradient through cSE alone, at a pixel, less its other terms
    y_ref.backward(dy[edges])
    dx_rest = dy[edges] * (gate[edges][:, :, None, None] + gs.reshape(4, 1, 1, 2)) + \
        dlogits_ref.reshape(4, 1, 1, 2) * ws[4]
    torch.testing.assert_close(cbias[edges][:, :, None, None].expand_as(x_edges), x_edges.grad - dx_rest,
                               rtol=1e-12, atol=1e-14)
    assert gate[2:N - 2].isnan().all()  # the blocks that did not run left their output poisoned
    monkeypatch.setenv("ATTN_KERNELS_EMULATION_GRID", "none")
    ops.scse_apply(dy, gate, logits, x, cbias, dlogits, dlogit_sums, *ws[4:])
    assert not ops._sample_tickets().any()
