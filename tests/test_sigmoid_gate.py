"""YOLOv4's SAM (point-wise and spatial) and Residual Attention's (1 + M) * T: the fused sigmoid
gate (ops/sigmoid_gate.py) vs the reference, gradients, the op contract, bad input.

Kernel tests run the 'triton' backend in Triton's interpreter on CPU where there is no GPU;
test_gpu.py runs both kernel backends at real shapes.
"""
import pytest
import torch

import attn_kernels
from attn_kernels import functional as F
from attn_kernels.ops.sigmoid_gate import is_spatial, sigmoid_gate_backward, sigmoid_gate_forward
from helpers import assert_close_to_reference, make_x

LAYOUTS = ["nchw", "channels_last"]
FORMS = [(False, False), (True, False), (False, True), (True, True)]  # (spatial, residual)
FORM_IDS = ["pointwise-sam", "spatial-sam", "residual-attention", "spatial-residual"]
SHAPES = [(2, 13, 5, 7), (3, 8, 1, 1), (2, 1, 4, 3), (1, 70, 3, 33)]


def inputs(shape, spatial, dtype=torch.float64, layout="nchw"):
    x = make_x(shape, dtype, layout=layout)
    logits = 3 * make_x((shape[0], 1, *shape[2:]) if spatial else shape, dtype, layout=layout, seed=2)
    return x, logits


def gate_step(x, logits, dy, residual, backend=None):
    x, logits = x.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    with attn_kernels.use_backend(backend or attn_kernels.get_backend()):
        y = F.sigmoid_gate(x, logits, residual=residual)
    y.backward(dy)
    return y.detach(), x.grad, logits.grad


def skip_pointwise_on_cuda(x, logits, backend):
    if backend == "cuda" and not is_spatial(x, logits):
        pytest.skip("the point-wise form (logits of x's shape) has a Triton kernel only")


def test_reference_is_the_papers_formula():
    x, logits = inputs((2, 4, 3, 3), False)
    torch.testing.assert_close(F.residual_attention(x, logits), (1 + torch.sigmoid(logits)) * x, rtol=0, atol=0)
    torch.testing.assert_close(F.sam(x, logits), x * torch.sigmoid(logits), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_kernel_matches_reference_float64(form, shape, layout, poisoned, cpu_kernel_backend):
    spatial, residual = form
    x, logits = inputs(shape, spatial, layout=layout)
    skip_pointwise_on_cuda(x, logits, cpu_kernel_backend)
    dy = make_x(shape, torch.float64, layout=layout, seed=1)
    with attn_kernels.use_backend(cpu_kernel_backend):
        assert F.sigmoid_gate_dispatch(x, logits).backend == cpu_kernel_backend
    expected = gate_step(x, logits, dy, residual, "reference")
    got = gate_step(x, logits, dy, residual, cpu_kernel_backend)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert got[0].stride() == x.stride() and got[1].stride() == x.stride() and got[2].shape == logits.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_kernel_low_precision_within_twice_eager_error(form, dtype, poisoned, cpu_kernel_backend):
    spatial, residual = form
    x, logits = inputs((2, 24, 6, 5), spatial, dtype)
    skip_pointwise_on_cuda(x, logits, cpu_kernel_backend)
    dy = make_x(tuple(x.shape), dtype, seed=1)
    ref = gate_step(x.double(), logits.double(), dy.double(), residual, "reference")
    eager = gate_step(x, logits, dy, residual, "reference")
    got = gate_step(x, logits, dy, residual, cpu_kernel_backend)
    for name, g, e, r in zip(["y", "dx", "dlogits"], got, eager, ref):
        assert_close_to_reference(name, g, e, r)


@pytest.mark.cpu_kernels
def test_sam_module():
    for spatial, k in [(False, 1), (True, 7)]:
        sam = attn_kernels.FusedSAM(16, spatial=spatial).double()
        assert sam.conv.kernel_size == (k, k) and sam.conv.out_channels == (1 if spatial else 16)
        assert f"spatial={spatial}" in repr(sam)
        x = make_x((2, 16, 5, 5), torch.float64)
        with attn_kernels.use_backend("triton"):
            assert sam.dispatch(x).backend == "triton"
            y = sam(x)
        torch.testing.assert_close(y, x * torch.sigmoid(sam.conv(x)))
    assert list(attn_kernels.FusedSAM(8).state_dict()) == ["conv.weight", "conv.bias"]
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        attn_kernels.FusedSAM(8, kernel_size=2)


@pytest.mark.cpu_kernels
def test_residual_attention_module():
    trunk, mask = inputs((2, 8, 3, 4), False)
    m = attn_kernels.FusedResidualAttention()
    with attn_kernels.use_backend("triton"):
        assert m.dispatch(trunk, mask).backend == "triton"
        torch.testing.assert_close(m(trunk, mask), (1 + torch.sigmoid(mask)) * trunk)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_opcheck(form):
    spatial, residual = form
    x, logits = inputs((2, 6, 4, 3), spatial, torch.float32)
    torch.library.opcheck(sigmoid_gate_forward, (x.requires_grad_(), logits.requires_grad_(), residual, "triton"))
    torch.library.opcheck(sigmoid_gate_backward, (torch.randn_like(x), x.detach(), logits.detach(), residual, "triton"))


def test_gradcheck_float64():
    for spatial, residual in FORMS:
        x, logits = inputs((2, 3, 3, 2), spatial)

        def fn(x, logits):
            with attn_kernels.use_backend("triton"):
                return F.sigmoid_gate(x, logits, residual=residual)

        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), logits.requires_grad_()))


def test_compile_fullgraph_has_no_graph_break():
    for spatial in (False, True):
        sam = attn_kernels.FusedSAM(8, spatial=spatial)
        x = make_x((2, 8, 5, 5))
        torch._dynamo.reset()
        with attn_kernels.use_backend("triton"):
            y = torch.compile(sam, fullgraph=True, backend="aot_eager")(x.requires_grad_())
            y.sum().backward()
            torch.testing.assert_close(y, sam(x.detach()))


@pytest.mark.cpu_kernels
def test_saves_x_and_logits_only():
    x, logits = inputs((2, 8, 4, 4), False, torch.float32)
    x.requires_grad_(), logits.requires_grad_()
    saved = []
    with attn_kernels.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        F.sam(x, logits)
    assert len(saved) == 2 and saved[0] is x and saved[1] is logits


def test_empty_batch():
    for spatial, residual in FORMS:
        x, logits = inputs((0, 4, 3, 3), spatial, torch.float32)
        x.requires_grad_(), logits.requires_grad_()
        with attn_kernels.use_backend("triton"):
            y = F.sigmoid_gate(x, logits, residual=residual)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape and logits.grad.shape == logits.shape


def test_dispatch_falls_back_with_a_reason():
    x, logits = inputs((2, 4, 3, 3), False, torch.float32)
    with attn_kernels.use_backend("triton"):
        d = F.sigmoid_gate_dispatch(x, logits.double())
        assert d.backend == "reference" and "one dtype" in d.passed_over["triton"]
        d = F.sigmoid_gate_dispatch(x, logits.contiguous(memory_format=torch.channels_last))
        assert d.backend == "reference" and "memory layout" in d.passed_over["triton"]
    with attn_kernels.use_backend("cuda"):
        assert "no cuda kernel" in F.sigmoid_gate_dispatch(x, logits).passed_over["cuda"]


def test_bad_input_names_the_argument():
    x = make_x((2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"logits must have x's shape \(2, 4, 3, 3\) or \(2, 1, 3, 3\)"):
        F.sam(x, make_x((2, 2, 3, 3)))
    with pytest.raises(TypeError, match="logits must be a tensor"):
        F.sam(x, 1.0)
    with pytest.raises(ValueError, match="x must be 4-D"):
        F.residual_attention(x[0], x[0])
