"""Attention transfer: at_map and at_loss (ops/attention_transfer.py) vs the paper's formulas,
gradients to the student only, size alignment, the op contract, bad input.

Kernel tests run the 'triton' backend in Triton's interpreter on CPU where there is no GPU;
test_gpu.py runs it at real shapes.
"""
import pytest
import torch
import torch.nn.functional as tf

import attn_kernels
from attn_kernels import reference
from attn_kernels.ops.attention_transfer import channel_power_mean, channel_power_mean_backward
from helpers import assert_close_to_reference, make_x

LAYOUTS = ["nchw", "channels_last"]


def papers_at(x):
    """The paper's code (szagoruyko/attention-transfer, utils.py), at p = 2."""
    return tf.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def test_reference_is_the_papers_code():
    s, t = make_x((3, 8, 5, 4), torch.float64), make_x((3, 16, 5, 4), torch.float64, seed=1)
    torch.testing.assert_close(reference.at_map(s), papers_at(s), rtol=0, atol=0)
    torch.testing.assert_close(reference.at_loss(s, t), (papers_at(s) - papers_at(t)).pow(2).mean(), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [2, 1, 3, 1.5])
@pytest.mark.cpu_kernels
@pytest.mark.parametrize("shapes", [((2, 8, 5, 7), (2, 12, 5, 7)), ((3, 5, 8, 8), (3, 70, 4, 4)),
                                    ((2, 6, 3, 6), (2, 4, 6, 3)), ((2, 3, 1, 1), (2, 3, 1, 1))], ids=str)
def test_triton_interpreted_matches_reference_float64(shapes, p, layout, poisoned):
    student = make_x(shapes[0], torch.float64, layout=layout).requires_grad_()
    teacher = make_x(shapes[1], torch.float64, layout=layout, seed=1).requires_grad_()
    with attn_kernels.use_backend("triton"):
        assert attn_kernels.functional.at_map_dispatch(student).backend == "triton"
        loss = attn_kernels.at_loss(student, teacher, p)
        a = attn_kernels.at_map(student, p)
    expected = reference.at_loss(student, teacher, p)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(a, reference.at_map(student, p), rtol=1e-12, atol=1e-15)
    got, = torch.autograd.grad(loss, student)
    want, = torch.autograd.grad(expected, student)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15 * want.abs().max().item())
    assert got.stride() == student.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [2, 1.5])
def test_power_mean_splits_channels_across_programs(layout, p, monkeypatch, poisoned):
    """Where the samples alone would leave the GPU idle (as at 2048x7x7), the power mean and its
    gradient split C across programs, the forward folding the splits' sums in order: both match
    float64 autograd. Triton sizes its grid for an H100 here."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    from attn_kernels.triton import power_mean

    monkeypatch.setenv("ATTN_KERNELS_INTERPRETER_SMS", "132")
    split_c, splits = power_mean.split_c, []

    def recorded_split_c(*args):
        result = split_c(*args)
        splits.append(result[0])
        return result

    monkeypatch.setattr(power_mean, "split_c", recorded_split_c)
    x = make_x((2, 300, 5, 6), torch.float64, layout=layout).requires_grad_()
    dm = torch.randn(2, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = x.abs().pow(p).mean(1).flatten(1)
    want_dx, = torch.autograd.grad(want, x, dm)
    m = channel_power_mean(x.detach(), p)
    dx = channel_power_mean_backward(dm, x.detach(), p)
    assert splits == [2, 2]  # both layouts' tiles: two splits of C
    torch.testing.assert_close(m, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=0)
    assert dx.stride() == x.stride()


def test_teacher_gets_no_gradient():
    student = make_x((2, 4, 3, 3)).requires_grad_()
    teacher = make_x((2, 4, 3, 3), seed=1).requires_grad_()
    with attn_kernels.use_backend("triton"):
        attn_kernels.at_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_interpreted_low_precision_within_twice_eager_error(dtype, poisoned):
    student, teacher = make_x((4, 32, 6, 6), dtype), make_x((4, 16, 6, 6), dtype, seed=1)

    def loss_and_grad(fn, s, t):
        s = s.detach().clone().requires_grad_()
        loss = fn(s, t)
        return loss.detach(), torch.autograd.grad(loss, s)[0]

    ref = loss_and_grad(reference.at_loss, student.double(), teacher.double())
    eager = loss_and_grad(reference.at_loss, student, teacher)
    with attn_kernels.use_backend("triton"):
        got = loss_and_grad(attn_kernels.at_loss, student, teacher)
    for name, g, e, r in zip(["loss", "dstudent"], got, eager, ref):
        assert_close_to_reference(name, g, e, r)


@pytest.mark.cpu_kernels
def test_opcheck():
    x = make_x((2, 6, 4, 3))
    torch.library.opcheck(channel_power_mean, (x.requires_grad_(), 2.0))
    torch.library.opcheck(channel_power_mean_backward, (torch.randn(2, 12), x.detach(), 3.0))


def test_gradcheck_float64():
    for p in (2, 1.5):
        x = make_x((2, 3, 3, 2), torch.float64).requires_grad_()
        t = make_x((2, 5, 3, 2), torch.float64, seed=1)

        def fn(x):
            with attn_kernels.use_backend("triton"):
                return attn_kernels.at_loss(x, t, p)

        assert torch.autograd.gradcheck(fn, (x,))


def test_compile_fullgraph_has_no_graph_break():
    s, t = make_x((2, 8, 6, 6)).requires_grad_(), make_x((2, 4, 3, 3), seed=1)
    torch._dynamo.reset()
    with attn_kernels.use_backend("triton"):
        loss = torch.compile(attn_kernels.at_loss, fullgraph=True, backend="aot_eager")(s, t)
        loss.backward()
        torch.testing.assert_close(loss, attn_kernels.at_loss(s.detach(), t))


@pytest.mark.cpu_kernels
def test_saves_only_the_student():
    s, t = make_x((2, 8, 4, 4)).requires_grad_(), make_x((2, 8, 4, 4), seed=1)
    saved = []
    with attn_kernels.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda u: saved.append(u) or u, lambda u: u):
        attn_kernels.at_loss(s, t)
    assert [u for u in saved if u.numel() >= s.numel()] == [s]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_batch(backend):
    s = torch.randn(0, 4, 3, 3, requires_grad=True)
    with attn_kernels.use_backend(backend):
        assert attn_kernels.at_map(s).shape == (0, 9)


def test_bad_input_names_the_argument():
    s = make_x((2, 4, 3, 3))
    with pytest.raises(ValueError, match="same batch size"):
        attn_kernels.at_loss(s, make_x((3, 4, 3, 3)))
    with pytest.raises(ValueError, match="p must be a number >= 1"):
        attn_kernels.at_map(s, 0.5)
    with pytest.raises(ValueError, match="x must be 4-D"):
        attn_kernels.at_map(s[0])
