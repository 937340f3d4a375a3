"""Modulated deformable convolution (DCNv2): the fused Triton kernels (ops/deform_conv.py) against
torchvision.ops.deform_conv2d and against reference.deform_conv2d (pure PyTorch, no torchvision),
outputs and all five gradients; the sampling's edge cases; the op contract; the drop-in modules
(torchvision's DeformConv2d, mmcv's ModulatedDeformConv2dPack); bad input; determinism.

Kernel tests run the 'triton' backend (the block's only kernel backend) in Triton's interpreter
on CPU where there is no GPU. Shapes are tiny: the interpreter runs every program in Python.
"""
import pytest
import torch

import attn_kernels
from attn_kernels import functional as F
from attn_kernels import reference
from attn_kernels.nn.deform_conv import FusedDeformConv2d, FusedModulatedDeformConv2dPack
from attn_kernels.ops.deform_conv import deform_conv2d_backward, deform_conv2d_forward
from conftest import require_cpu_backend
from helpers import FAST_GRADCHECK, assert_close_to_reference

tv_ops = pytest.importorskip("torchvision.ops")

kernels = pytest.mark.cpu_kernels


@pytest.fixture
def triton_backend():
    return require_cpu_backend("triton")


def out_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - (dilation * (k - 1) + 1)) // stride + 1


def sample_grid(Hout, Wout, kh, kw, stride, padding, dilation):
    """The integer sampling positions (y, x) of every tap at every output pixel, (kh*kw, Hout, Wout)."""
    ky, kx = torch.meshgrid(torch.arange(kh) * dilation[0], torch.arange(kw) * dilation[1], indexing="ij")
    y = torch.arange(Hout) * stride[0] - padding[0]
    x = torch.arange(Wout) * stride[1] - padding[1]
    return (ky.reshape(-1, 1, 1) + y.reshape(1, -1, 1)).double(), (kx.reshape(-1, 1, 1) + x.reshape(1, 1, -1)).double()


def make_case(N=2, C=4, H=5, W=6, O=4, kernel=(3, 3), groups=1, offset_groups=1, stride=(1, 1), padding=(1, 1),
              dilation=(1, 1), mask=True, bias=True, offsets="random", layout="nchw", seed=0):
    """float64 (input, offset, weight, bias, mask) and the conv arguments. offsets: 'random'
    (normal, scale 2: many samples outside the image), 'integer' (whole and half pixels: samples on
    pixels and on the borders between them), 'edges' (samples exactly at y or x = -1, 0, H-1, H and
    around them)."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    Hout, Wout = out_size(H, kh, stride[0], padding[0], dilation[0]), out_size(W, kw, stride[1], padding[1], dilation[1])
    K = kh * kw
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(O, C // groups, kh, kw, generator=g, dtype=torch.float64)
    shape = (N, offset_groups, K, Hout, Wout)
    if offsets == "random":
        off = 2 * torch.randn(*shape, 2, generator=g, dtype=torch.float64)
    elif offsets == "integer":
        off = torch.randint(-4, 5, (*shape, 2), generator=g).double() / 2
    else:
        gy, gx = sample_grid(Hout, Wout, kh, kw, stride, padding, dilation)
        targets_y = torch.tensor([-1.5, -1, -1 + 2**-20, -0.5, 0, H - 1, H - 0.5, H - 2**-20, H, H + 0.25], dtype=torch.float64)
        targets_x = torch.tensor([-1.5, -1, -1 + 2**-20, -0.5, 0, W - 1, W - 0.5, W - 2**-20, W, W + 0.25], dtype=torch.float64)
        ty = targets_y[torch.randint(len(targets_y), shape, generator=g)]
        tx = targets_x[torch.randint(len(targets_x), shape, generator=g)]
        off = torch.stack([ty - gy, tx - gx], -1)  # exactly representable: the targets are hit exactly
    offset = off.permute(0, 1, 2, 5, 3, 4).reshape(N, 2 * offset_groups * K, Hout, Wout).contiguous()
    m = torch.rand(N, offset_groups * K, Hout, Wout, generator=g, dtype=torch.float64) if mask else None
    b = torch.randn(O, generator=g, dtype=torch.float64) if bias else None
    return (x, offset, weight, b, m), dict(stride=stride, padding=padding, dilation=dilation)


def step(fn, tensors, conv, dy):
    """(out, grads of input, offset, weight, bias, mask) of fn; None for absent ones."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]  # layouts kept
    x, offset, weight, bias, mask = leaves
    out = fn(x, offset, weight, bias, mask=mask, **conv)
    out.backward(dy)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def kernel_fn(x, offset, weight, bias, **kwargs):
    with attn_kernels.use_backend("triton"):
        assert F.deform_conv2d_dispatch(x, offset, weight, bias, **kwargs).backend == "triton"
        return F.deform_conv2d(x, offset, weight, bias, **kwargs)


NAMES = ["out", "input", "offset", "weight", "bias", "mask"]


def assert_all_close(got, want, rtol, label):
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, f"{label}: {name} gradient should be None"
            continue
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{label}: {name}: {m}")


CASES = {
    "mask-bias": {},
    "no-mask-no-bias": dict(mask=False, bias=False),
    "integer-offsets": dict(offsets="integer"),
    "edge-offsets": dict(offsets="edges", padding=(0, 0)),
    "edge-offsets-no-mask": dict(offsets="edges", mask=False, seed=3),
    "groups2-offset-groups2": dict(groups=2, offset_groups=2),
    "groups2-offset-groups4": dict(groups=2, offset_groups=4, offsets="integer"),
    "depthwise": dict(groups=4, O=8),
    "stride2-nonsquare": dict(stride=(2, 1), padding=(1, 2), kernel=(2, 3)),
    "dilation2": dict(dilation=(2, 2), padding=(2, 1), kernel=(3, 2), O=5),
    "channels-last": dict(layout="channels_last", offset_groups=2),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_reference_matches_torchvision(case):
    tensors, conv = make_case(**CASES[case])
    dy = torch.randn(tv_ops.deform_conv2d(*tensors[:4], mask=tensors[4], **conv).shape, dtype=torch.float64)
    want = step(tv_ops.deform_conv2d, tensors, conv, dy)
    got = step(reference.deform_conv2d, tensors, conv, dy)
    assert_all_close(got, want, 1e-12, "reference vs torchvision")


# Every case in torch's deterministic mode (dx gathered); the atomic scatter of dx in a few (the
# other kernels are shared by both).
KERNEL_CASES = [(case, True) for case in CASES] + [
    (case, False) for case in ("mask-bias", "edge-offsets", "groups2-offset-groups2", "channels-last")]


@kernels
@pytest.mark.parametrize("case,deterministic", KERNEL_CASES,
                         ids=[f"{c}-{'deterministic' if d else 'atomic'}-dx" for c, d in KERNEL_CASES])
def test_kernel_matches_torchvision_and_reference(case, deterministic, triton_backend, request):
    if deterministic:  # torch's deterministic mode, with new allocations NaN-filled (poisoned)
        request.getfixturevalue("poisoned")
    tensors, conv = make_case(**CASES[case])
    out_shape = tv_ops.deform_conv2d(*tensors[:4], mask=tensors[4], **conv).shape
    dy = torch.randn(out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = step(kernel_fn, tensors, conv, dy)
    assert_all_close(got, step(tv_ops.deform_conv2d, tensors, conv, dy), 1e-12, "kernel vs torchvision")
    assert_all_close(got, step(reference.deform_conv2d, tensors, conv, dy), 1e-12, "kernel vs reference")
    # out and dx in the input's memory format
    x = tensors[0]
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    assert got[0].is_contiguous(memory_format=fmt) and got[1].stride() == x.stride()


@kernels
def test_edge_gradients_are_torchvisions_not_zero(triton_backend):
    """At exactly y = -1 the sample is zero but torchvision's offset gradient is not (its
    get_coordinate_weight reads row 0): the kernel must agree, not return the one-sided zero."""
    tensors, conv = make_case(N=1, C=2, H=4, W=4, O=2, kernel=(1, 1), padding=(0, 0), mask=False)
    x, offset, weight, bias, _ = tensors
    offset = torch.zeros_like(offset)
    offset[0, 0, 0, 1] = -1.0  # output pixel (0, 1) samples (y, x) = (-1, 1)
    dy = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    got = step(kernel_fn, (x, offset, weight, bias, None), conv, dy)
    want = step(tv_ops.deform_conv2d, (x, offset, weight, bias, None), conv, dy)
    assert want[2][0, 0, 0, 1] != 0
    assert_all_close(got, want, 1e-12, "edge")


@kernels
def test_nan_offset_gives_nan_as_torchvisions_formula(triton_backend):
    """A NaN sampling position is none of torchvision's outside tests: its sample, and so the
    output and the mask's gradient there, are NaN (the reference's; torchvision's CPU op crashes
    on a NaN offset). Elsewhere the results stay finite and agree."""
    tensors, conv = make_case(N=1, C=2, H=4, W=4, O=2)
    x, offset, weight, bias, mask = tensors
    offset = offset.clone()
    offset[0, 2, 1, 1] = float("nan")  # tap 1's y at output pixel (1, 1)
    dy = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    got = step(kernel_fn, (x, offset, weight, bias, mask), conv, dy)
    want = step(reference.deform_conv2d, (x, offset, weight, bias, mask), conv, dy)
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN at {g.isnan().nonzero().tolist()[:4]}"
        torch.testing.assert_close(g[~w.isnan()], w[~w.isnan()], rtol=1e-12, atol=1e-12, msg=name)
    assert got[0][0, :, 1, 1].isnan().all() and got[5][0, 1, 1, 1].isnan()


@kernels
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dx", "deterministic-dx"])
def test_infinite_dy_reaches_only_the_pixels_within_distance_one(deterministic, triton_backend):
    """Positions on whole pixels (zero offsets): torchvision's col2im adds dy to the pixel itself
    only, not to the far corners at weight 0, so an infinite dy leaves inf in one pixel of dx and
    no NaN beside it."""
    tensors, conv = make_case(N=1, C=2, H=4, W=4, O=2, kernel=(1, 1), padding=(0, 0), mask=False)
    x, offset, weight, bias, _ = tensors
    offset = torch.zeros_like(offset)
    dy = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    dy[0, 0, 1, 1] = float("inf")
    want = step(tv_ops.deform_conv2d, (x, offset, weight, bias, None), conv, dy)[1]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = step(kernel_fn, (x, offset, weight, bias, None), conv, dy)[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not want.isnan().any()
    assert torch.equal(got.isinf(), want.isinf()) and not got.isnan().any()
    torch.testing.assert_close(got[want.isfinite()], want[want.isfinite()], rtol=1e-12, atol=1e-12)


@kernels
def test_images_of_no_pixels(triton_backend):
    """H = 0 padded to an output of two rows, as torchvision allows: every sample is zero, and the
    backward runs on both dx paths."""
    tensors, conv = make_case(N=2, C=4, H=0, W=5, O=4, kernel=(1, 3), padding=(1, 1))
    dy = torch.randn(2, 4, 2, 5, dtype=torch.float64)
    want = step(tv_ops.deform_conv2d, tensors, conv, dy)
    for deterministic in (False, True):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = step(kernel_fn, tensors, conv, dy)
        finally:
            torch.use_deterministic_algorithms(previous)
        assert_all_close(got, want, 1e-12, f"H = 0, deterministic={deterministic}")


@kernels
def test_empty_batch(triton_backend):
    for mask in (True, False):
        tensors, conv = make_case(N=0, mask=mask)
        dy = torch.empty(0, 4, 5, 6, dtype=torch.float64)
        got = step(kernel_fn, tensors, conv, dy)
        assert got[0].shape == (0, 4, 5, 6)
        x, offset, weight, bias, mask = tensors
        for name, g, t in zip(NAMES[1:], got[1:], (x, offset, weight, bias, mask)):
            assert (g is None) == (t is None), name
            if t is not None:
                assert g.shape == t.shape, name
        assert torch.equal(got[3], torch.zeros_like(weight)) and torch.equal(got[4], torch.zeros_like(bias))


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_twice_eager_error(dtype, triton_backend, poisoned):
    """Against the float64 truth, within twice the error of the eager computation at that dtype:
    torchvision's (float32, float16), the reference's for bfloat16 (torchvision's CPU kernels take
    no bfloat16)."""
    tensors, conv = make_case(N=2, C=8, O=8, offsets="random", seed=5)
    dy = torch.randn(2, 8, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    low = [t.to(dtype) if t is not None else None for t in tensors]
    truth = step(tv_ops.deform_conv2d, [t.to(dtype).double() if t is not None else None for t in tensors], conv,
                 dy.to(dtype).double())
    eager_fn = reference.deform_conv2d if dtype == torch.bfloat16 else tv_ops.deform_conv2d
    eager = step(eager_fn, low, conv, dy.to(dtype))
    got = step(kernel_fn, low, conv, dy.to(dtype))
    for name, g, e, r in zip(NAMES, got, eager, truth):
        assert_close_to_reference(name, g, e, r)


@kernels
def test_gradcheck_float64(triton_backend):
    tensors, conv = make_case(N=1, C=2, H=4, W=4, O=2, groups=2, offset_groups=2, kernel=(2, 2), padding=(0, 1))
    leaves = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda x, o, w, b, m: kernel_fn(x, o, w, b, mask=m, **conv), leaves,
                                    fast_mode=FAST_GRADCHECK)


@kernels
def test_opcheck(triton_backend):
    tensors, conv = make_case(N=1, C=2, H=3, W=3, O=2, kernel=(2, 2), groups=2, offset_groups=2)
    x, offset, weight, bias, mask = [t.float() for t in tensors]
    args = (list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]))
    torch.library.opcheck(deform_conv2d_forward, (x.requires_grad_(), weight.requires_grad_(), offset.requires_grad_(),
                                                  mask.requires_grad_(), bias.requires_grad_(), *args))
    dy = torch.randn(1, 2, 4, 4)
    torch.library.opcheck(deform_conv2d_backward, (dy, x.detach(), weight.detach(), offset.detach(), mask.detach(), True,
                                                   *args))
    torch.library.opcheck(deform_conv2d_backward, (dy, x.detach(), weight.detach(), offset.detach(), None, False, *args))


@kernels
def test_compile_fullgraph_has_no_graph_break(triton_backend):
    torch.manual_seed(0)
    model = FusedModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2)
    with torch.no_grad():
        model.conv_offset.weight.normal_(0, 0.3)  # non-zero offsets and masks
    x = torch.randn(2, 4, 5, 6)
    torch._dynamo.reset()
    with attn_kernels.use_backend("triton"):
        y = torch.compile(model, fullgraph=True, backend="aot_eager")(x.requires_grad_())
        y.sum().backward()
        torch.testing.assert_close(y, model(x.detach()))


@kernels
def test_saves_only_the_inputs(triton_backend):
    tensors, conv = make_case()
    x, offset, weight, bias, mask = [t.float().requires_grad_() for t in tensors]
    saved = []
    with attn_kernels.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        F.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    assert len(saved) == 4 and all(s is t for s, t in zip(saved, (x, weight, offset, mask)))


def largest_allocation(fn) -> int:
    """The most bytes of any tensor a torch op creates while fn() runs (Triton's interpreter's byte
    copies of the kernels' arguments among them). A dispatch mode sees the ops fn calls itself, not
    those inside a custom op: fn calls the kernels' launchers directly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.numel() * t.element_size())
            return out

    with Largest():
        fn()
    return Largest.nbytes


@kernels
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dx", "deterministic-dx"])
def test_nothing_columns_sized_is_allocated(deterministic, triton_backend):
    """The launchers of the forward and the backward allocate nothing near one image's im2col
    columns (C*kh*kw*Hout*Wout elements; torchvision's op allocates them for a batch of images):
    their buffers are of the size of x (dx's float32 accumulator), the offsets (the deterministic
    gather's sorted samples: 4*N*D*kh*kw*Hout*Wout int64 keys, which grow with N and the offset
    groups but not with C) or the weights (dweight's partial sums). The reference, which builds the
    columns, shows that the count sees them."""
    from attn_kernels import triton as triton_kernels

    (x, offset, weight, bias, mask), conv = make_case(N=2, C=64, H=8, W=8, O=8)
    x, offset, weight, bias, mask = [t.float() for t in (x, offset, weight, bias, mask)]
    args = (conv["stride"], conv["padding"], conv["dilation"])
    dy = torch.randn(2, 8, 8, 8)
    columns = 64 * 9 * 8 * 8 * 4  # bytes, float32

    def kernels_forward_and_backward():
        triton_kernels.deform_conv2d(x, weight, offset, mask, bias, *args)
        triton_kernels.deform_conv2d_backward(dy, x, weight, offset, mask, True, *args)

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        largest = largest_allocation(kernels_forward_and_backward)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert largest < columns // 2, f"a tensor of {largest} bytes; one image's columns have {columns}"
    assert largest_allocation(lambda: reference.deform_conv2d(x, offset, weight, bias, *args, mask=mask)) >= columns


@kernels
def test_deterministic_mode_is_bitwise_reproducible(triton_backend):
    """Under torch.use_deterministic_algorithms(True) dx is gathered in a fixed order (no atomics);
    dweight's split partials are summed in a fixed order always."""
    tensors, conv = make_case(N=1, offset_groups=2, offsets="integer", seed=11)
    dy = torch.randn(1, 4, 5, 6, dtype=torch.float64)
    tensors = [t.float() for t in tensors]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = step(kernel_fn, tensors, conv, dy.float())
        second = step(kernel_fn, tensors, conv, dy.float())
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
    atomic = step(kernel_fn, tensors, conv, dy.float())
    assert_all_close(atomic, first, 1e-5, "atomic vs deterministic dx")


@kernels
def test_torchvision_module_drop_in(triton_backend):
    torch.manual_seed(0)
    for kwargs in (dict(padding=1), dict(stride=2, padding=(1, 2), dilation=(1, 2), groups=2, bias=False)):
        tv = tv_ops.DeformConv2d(4, 6, (3, 2), **kwargs).double()
        torch.manual_seed(0)
        tv_again = tv_ops.DeformConv2d(4, 6, (3, 2), **kwargs)
        torch.manual_seed(0)
        fused = FusedDeformConv2d(4, 6, (3, 2), **kwargs)
        assert list(fused.state_dict()) == list(tv.state_dict())
        for (name, p), q in zip(fused.named_parameters(), tv_again.parameters()):
            assert torch.equal(p, q), f"init of {name}"
        assert repr(fused) == repr(tv).replace("DeformConv2d", "FusedDeformConv2d")
        fused = fused.double()
        fused.load_state_dict(tv.state_dict())
        x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
        Hout = out_size(6, 3, *tv.stride[:1], tv.padding[0], tv.dilation[0])
        Wout = out_size(7, 2, tv.stride[1], tv.padding[1], tv.dilation[1])
        offset = torch.randn(2, 12, Hout, Wout, dtype=torch.float64)
        mask = torch.rand(2, 6, Hout, Wout, dtype=torch.float64)
        with attn_kernels.use_backend("triton"):
            assert fused.dispatch(x, offset, mask).backend == "triton"
            torch.testing.assert_close(fused(x, offset, mask), tv(x, offset, mask), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(fused(x, offset), tv(x, offset), rtol=1e-12, atol=1e-12)


class MMCVPackRewrite(torch.nn.Module):
    """mmcv.ops.ModulatedDeformConv2dPack (mmcv/ops/modulated_deform_conv.py) in plain PyTorch: its
    __init__ (ModulatedDeformConv2d.init_weights, then conv_offset, then init_weights again) and
    forward; torchvision's deform_conv2d stands in for mmcv's compiled modulated_deform_conv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=True):
        super().__init__()
        self.in_channels, self.kernel_size = in_channels, torch.nn.modules.utils._pair(kernel_size)
        self.stride, self.padding = torch.nn.modules.utils._pair(stride), torch.nn.modules.utils._pair(padding)
        self.dilation = torch.nn.modules.utils._pair(dilation)
        self.weight = torch.nn.Parameter(torch.Tensor(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = torch.nn.Parameter(torch.Tensor(out_channels)) if bias else None
        self.init_weights()
        self.conv_offset = torch.nn.Conv2d(in_channels, deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1],
                                           kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                           dilation=self.dilation, bias=True)
        self.init_weights()

    def init_weights(self):
        n = self.in_channels
        for k in self.kernel_size:
            n *= k
        stdv = 1. / n ** 0.5
        self.weight.data.uniform_(-stdv, stdv)
        if self.bias is not None:
            self.bias.data.zero_()
        if hasattr(self, "conv_offset"):
            self.conv_offset.weight.data.zero_()
            self.conv_offset.bias.data.zero_()

    def forward(self, x):
        out = self.conv_offset(x)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return tv_ops.deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


@kernels
def test_mmcv_pack_matches_mmcvs_forward(triton_backend):
    for kwargs in (dict(padding=1, deform_groups=2), dict(stride=2, dilation=2, padding=2, groups=2, bias=False)):
        torch.manual_seed(3)
        rewrite = MMCVPackRewrite(4, 4, 3, **kwargs)
        torch.manual_seed(3)
        fused = FusedModulatedDeformConv2dPack(4, 4, 3, **kwargs)
        assert list(fused.state_dict()) == list(rewrite.state_dict())
        for name, p in fused.state_dict().items():
            assert torch.equal(p, rewrite.state_dict()[name]), f"init of {name}"
        with torch.no_grad():  # beyond the zero init: offsets and masks that vary
            rewrite.conv_offset.weight.normal_(0, 0.5)
            rewrite.conv_offset.bias.normal_(0, 0.5)
        rewrite.double()
        fused = fused.double()
        fused.load_state_dict(rewrite.state_dict())
        x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
        x_r, x_f = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn_like(rewrite(x))
        rewrite(x_r).backward(dy)
        with attn_kernels.use_backend("triton"):
            assert fused.dispatch(x).backend == "triton"
            y = fused(x_f)
        y.backward(dy)
        torch.testing.assert_close(y, rewrite(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x_f.grad, x_r.grad, rtol=1e-12, atol=1e-12)
        for (name, p), q in zip(fused.named_parameters(), rewrite.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-11, msg=name)


def test_mmcv_pack_matches_real_mmcv():
    mmcv_ops = pytest.importorskip("mmcv.ops", reason="mmcv with compiled ops is not installed")
    torch.manual_seed(0)
    theirs = mmcv_ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2)
    ours = FusedModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_bad_input_names_the_argument():
    tensors, conv = make_case()
    x, offset, weight, bias, mask = tensors
    with pytest.raises(ValueError, match="input must be 4-D"):
        F.deform_conv2d(x[0], offset, weight, bias, mask=mask, **conv)
    with pytest.raises(ValueError, match=r"offset must have shape \(2, 18, 5, 6\)"):
        F.deform_conv2d(x, offset[:, :, :4], weight, bias, mask=mask, **conv)
    with pytest.raises(ValueError, match=r"offset.shape\[1\] must be"):
        F.deform_conv2d(x, offset[:, :17], weight, bias, mask=mask, **conv)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 9, 5, 6\)"):
        F.deform_conv2d(x, offset, weight, bias, mask=mask[:, :8], **conv)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        F.deform_conv2d(x, offset, weight, bias[:3], mask=mask, **conv)
    with pytest.raises(ValueError, match="weight must have a divisor"):
        F.deform_conv2d(x, offset, torch.randn(4, 3, 3, 3, dtype=torch.float64), bias, mask=mask, **conv)
    with pytest.raises(ValueError, match="weight must have a divisor of input's 0 channels"):
        F.deform_conv2d(x[:, :0], offset, weight, bias, mask=mask, **conv)
    with pytest.raises(TypeError, match="mask must have input's dtype"):
        F.deform_conv2d(x, offset, weight, bias, mask=mask.float(), **conv)
    with pytest.raises(TypeError, match="offset must be a tensor"):
        F.deform_conv2d(x, 1.0, weight, bias, mask=mask, **conv)
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints >= 1"):
        F.deform_conv2d(x, offset, weight, bias, mask=mask, stride=0, padding=1)
    with pytest.raises(ValueError, match="padding must be"):
        F.deform_conv2d(x, offset, weight, bias, mask=mask, padding=(1, 1, 1))
    with pytest.raises(ValueError, match="too small"):
        F.deform_conv2d(x, offset, weight, bias, mask=mask, padding=0, dilation=4)


def test_dispatch_falls_back_with_a_reason():
    tensors, conv = make_case()
    x, offset, weight, bias, mask = tensors
    strided = x[:, :, :, ::1].transpose(2, 3).contiguous().transpose(2, 3)  # neither NCHW nor channels_last
    with attn_kernels.use_backend("triton"):
        d = F.deform_conv2d_dispatch(strided, offset, weight, bias, mask=mask, **conv)
        assert d.backend == "reference" and "neither contiguous NCHW nor channels_last" in d.passed_over["triton"]
        torch.testing.assert_close(F.deform_conv2d(strided, offset, weight, bias, mask=mask, **conv),
                                   tv_ops.deform_conv2d(x, offset, weight, bias, mask=mask, **conv))
    with attn_kernels.use_backend("cuda"):
        assert "no cuda kernel" in F.deform_conv2d_dispatch(x, offset, weight, bias, mask=mask, **conv).passed_over["cuda"]



@kernels
def test_autocast_runs_in_the_autocast_dtype(triton_backend):
    """Under autocast, as nn.Conv2d: the op in the autocast dtype (bfloat16 here), float32 tensors given."""
    tensors, conv = make_case()
    x, offset, weight, bias, mask = [t.float() for t in tensors]
    with attn_kernels.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.deform_conv2d(x, offset, weight, bias, mask=mask, **conv)
    assert y.dtype == torch.bfloat16
    rounded = [t.bfloat16().double() for t in (x, offset, weight, bias, mask)]
    expected = reference.deform_conv2d(*rounded[:4], mask=rounded[4], **conv)
    # bfloat16's rounding of the output (2^-8 relative), the sums in float32
    torch.testing.assert_close(y.double(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())
