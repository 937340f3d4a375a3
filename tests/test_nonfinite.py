"""NaN and +-inf behave as in PyTorch: every block's output, its inputs' gradients, every parameter
gradient and the BatchNorm running statistics carry NaN, +inf and -inf exactly where the eager
module's do (timm's, smp's, or the papers' code the project mirrors), run in float64, and agree elsewhere.

Non-finite values are planted in x (float32) in sample 0: a single element, a whole (n, c) plane,
a whole pixel across the channels (each as NaN, +inf and -inf), and +inf with -inf in one plane and
in one pixel (their sums are NaN). Sample 1 stays finite, and so must its results wherever samples
do not mix (everywhere but BatchNorm in training). Max pooling is torch.amax's: the max of a plane
holding a NaN is NaN, and its gradient, shared by the elements equal to the max (none then), is
NaN over the whole plane.

Every kernel backend runs (the `kernel_backend` fixture: on CPU 'triton' in Triton's interpreter
and 'cuda' under its CPU emulation; on a GPU both, compiled, on CUDA tensors), and the reference.
The interpreter's tl.max drops NaN as compiled code's does (numpy's nanmax), so a NaN-ignoring
reduction fails here too; its elementwise tl.maximum propagates NaN where compiled code's does not
(without propagate_nan=tl.PropagateNan.ALL): that only the GPU run and the TTIR check
(attn_kernels.kernel_report) catch.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as tf
from torch import nn

import attn_kernels
from helpers import make_x, randomized, timm_layers
from patchable import SCSEModule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (2, 8, 4, 5)  # (N, C, H, W): non-finite values go into sample 0; sample 1 stays finite
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: one thread runs them faster than a pool (much faster on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _element(v):
    def plant(x):
        x[0, 2, 1, 3] = v
    return plant


def _plane(v):
    def plant(x):
        x[0, 3] = v
    return plant


def _pixel(v):
    def plant(x):
        x[0, :, 2, 1] = v
    return plant


def _both_infinities(x):
    x[0, 1, 0, 0] = INF   # +inf and -inf in one plane ...
    x[0, 1, 3, 4] = -INF
    x[0, 5, 0, 0] = -INF  # ... and in one pixel


PLANTINGS = {
    **{f"{name} element": _element(v) for name, v in [("nan", NAN), ("+inf", INF), ("-inf", -INF)]},
    **{f"{name} plane": _plane(v) for name, v in [("nan", NAN), ("+inf", INF), ("-inf", -INF)]},
    **{f"{name} pixel": _pixel(v) for name, v in [("nan", NAN), ("+inf", INF), ("-inf", -INF)]},
    "+inf and -inf": _both_infinities,
}


def planted(planting):
    x = make_x(SHAPE)
    PLANTINGS[planting](x)
    return x.to(DEVICE)


# ---- the blocks and their eager twins -------------------------------------------------------

def timm_pair(make_eager, make_fused):
    """(eager, fused) from timm's module and its drop-in, with the same random state."""
    def make():
        torch.manual_seed(0)
        eager = randomized(make_eager())
        fused = make_fused()
        fused.load_state_dict(eager.state_dict(), strict=True)
        return eager, fused
    return make


class OfficialCBAM(nn.Module):
    """The official CBAM code (Jongchan/attention-module) on FusedCBAMOfficial's parameters and
    state_dict, with its max pools as torch.amax: the project shares a max's gradient among tied
    maxima as amax does (see FusedCBAMOfficial), which with a NaN max is NaN over the whole plane."""

    def __init__(self, fused):
        super().__init__()
        self.ChannelGate = copy.deepcopy(fused.ChannelGate)
        self.no_spatial = fused.no_spatial
        if not fused.no_spatial:
            self.SpatialGate = copy.deepcopy(fused.SpatialGate)

    def forward(self, x):
        fc1, fc2 = self.ChannelGate.mlp[1], self.ChannelGate.mlp[3]
        pooled = {"avg": x.mean((2, 3)), "max": x.amax((2, 3))}
        logits = sum(fc2(torch.relu(fc1(pooled[t]))) for t in self.ChannelGate.pool_types)
        x = x * torch.sigmoid(logits)[:, :, None, None]
        if self.no_spatial:
            return x
        sp = self.SpatialGate.spatial
        maps = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(sp.bn(sp.conv(maps)))


def official_pair(pool_types, no_spatial=False):
    def make():
        torch.manual_seed(0)
        fused = randomized(attn_kernels.FusedCBAMOfficial(SHAPE[1], reduction_ratio=4, pool_types=pool_types,
                                                          no_spatial=no_spatial))
        return OfficialCBAM(fused), fused
    return make


class SAMTwin(nn.Module):
    """YOLOv4's SAM: x * sigmoid(conv(x))."""

    def __init__(self, fused):
        super().__init__()
        self.conv = copy.deepcopy(fused.conv)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


def sam_pair(spatial):
    # Point-wise SAM keeps its default 1x1 conv: the weight gradient of a padded conv picks up NaN
    # from the zero padding (0 * NaN) in PyTorch's float64 CPU convolution but not in oneDNN's
    # float32 one on AVX-512 machines, a difference of PyTorch's own, outside the fused gate (see
    # _native_cpu_convolution, which now pins the native kernel for both).
    def make():
        torch.manual_seed(0)
        fused = randomized(attn_kernels.FusedSAM(SHAPE[1], spatial=spatial))
        return SAMTwin(fused), fused
    return make


class ResidualAttentionTwin(nn.Module):
    def forward(self, trunk, mask_logits):
        return (1 + torch.sigmoid(mask_logits)) * trunk


class AtMap(nn.Module):
    def forward(self, x):
        return attn_kernels.at_map(x)


class AtLoss(nn.Module):
    def forward(self, student, teacher):
        return attn_kernels.at_loss(student, teacher)


def papers_at(x):
    """The paper's code (szagoruyko/attention-transfer, utils.py)."""
    return tf.normalize(x.pow(2).mean(1).view(x.size(0), -1))


class AtMapTwin(nn.Module):
    def forward(self, x):
        return papers_at(x)


class AtLossTwin(nn.Module):
    def forward(self, student, teacher):
        return (papers_at(student) - papers_at(teacher.detach())).pow(2).mean()


def no_parameters(eager, fused):
    return lambda: (eager(), fused())


C = SHAPE[1]
GC_CONFIGS = {
    "att+scale": {},
    "att+scale+add": {"fuse_add": True},
    "att+add": {"fuse_add": True, "fuse_scale": False},
    "avg+scale+add": {"use_attn": False, "fuse_add": True},
}
# name -> (make () -> (eager, fused), has BatchNorm)
BLOCKS = {
    "se": (timm_pair(lambda: timm_layers.SEModule(C, rd_ratio=0.25),
                     lambda: attn_kernels.FusedSE(C, rd_ratio=0.25)), False),
    "se add_maxpool": (timm_pair(lambda: timm_layers.SEModule(C, rd_ratio=0.25, add_maxpool=True),
                                 lambda: attn_kernels.FusedSE(C, rd_ratio=0.25, add_maxpool=True)), False),
    # PyTorch's hard_sigmoid backward selects: 0 at an infinite or NaN logit, whatever the gradient.
    "se add_maxpool hard_sigmoid": (timm_pair(
        lambda: timm_layers.SEModule(C, rd_ratio=0.25, add_maxpool=True, gate_layer="hard_sigmoid"),
        lambda: attn_kernels.FusedSE(C, rd_ratio=0.25, add_maxpool=True, gate_layer="hard_sigmoid")), False),
    "channel_attn": (timm_pair(lambda: timm_layers.cbam.ChannelAttn(C, rd_ratio=0.25),
                               lambda: attn_kernels.FusedChannelAttn(C, rd_ratio=0.25)), False),
    "spatial_attn": (timm_pair(lambda: timm_layers.cbam.SpatialAttn(3),
                               lambda: attn_kernels.FusedSpatialAttn(3)), True),
    "cbam": (timm_pair(lambda: timm_layers.cbam.CbamModule(C, rd_ratio=0.25, spatial_kernel_size=3),
                       lambda: attn_kernels.FusedCBAM(C, rd_ratio=0.25, spatial_kernel_size=3)), True),
    "cbam hard_sigmoid": (timm_pair(
        lambda: timm_layers.cbam.CbamModule(C, rd_ratio=0.25, spatial_kernel_size=3, gate_layer="hard_sigmoid"),
        lambda: attn_kernels.FusedCBAM(C, rd_ratio=0.25, spatial_kernel_size=3, gate_layer="hard_sigmoid")), True),
    "light_cbam": (timm_pair(lambda: timm_layers.cbam.LightCbamModule(C, rd_ratio=0.25, spatial_kernel_size=3),
                             lambda: attn_kernels.FusedLightCBAM(C, rd_ratio=0.25, spatial_kernel_size=3)), True),
    "official avg+max": (official_pair(["avg", "max"]), True),
    "official max": (official_pair(["max"]), True),
    "official avg": (official_pair(["avg"]), True),
    "official avg+max no_spatial": (official_pair(["avg", "max"], no_spatial=True), False),
    "eca": (timm_pair(lambda: timm_layers.EcaModule(C), lambda: attn_kernels.FusedECA(C)), False),
    "ceca": (timm_pair(lambda: timm_layers.CecaModule(C), lambda: attn_kernels.FusedCECA(C)), False),
    **{f"gc {name}": (timm_pair(lambda kw=kw: timm_layers.GlobalContext(C, rd_ratio=0.25, **kw),
                                lambda kw=kw: attn_kernels.FusedGC(C, rd_ratio=0.25, **kw)), False)
       for name, kw in GC_CONFIGS.items()},
    "selective_kernel": (timm_pair(lambda: timm_layers.SelectiveKernel(C, rd_channels=4),
                                   lambda: attn_kernels.FusedSelectiveKernel(C, rd_channels=4)), True),
    "scse": (timm_pair(lambda: SCSEModule(C, reduction=4), lambda: attn_kernels.FusedSCSE(C, reduction=4)), False),
    "sam point-wise": (sam_pair(False), False),
    "sam spatial": (sam_pair(True), False),
    "residual_attention trunk": (no_parameters(ResidualAttentionTwin, attn_kernels.FusedResidualAttention), False),
    "residual_attention mask": (no_parameters(ResidualAttentionTwin, attn_kernels.FusedResidualAttention), False),
    "at_map": (no_parameters(AtMapTwin, AtMap), False),
    "at_loss student": (no_parameters(AtLossTwin, AtLoss), False),
    "at_loss teacher": (no_parameters(AtLossTwin, AtLoss), False),
}
BLOCK_MODES = [(name, train) for name, (_, bn) in BLOCKS.items() for train in ([True, False] if bn else [True])]


def arguments(block, x):
    """The module's inputs with the planted x among them (the others finite, in x's dtype)."""
    other = make_x(SHAPE if block != "at_loss teacher" else (2, 6, 4, 5), seed=5).to(x)
    if block == "residual_attention mask":
        return [3 * other, x]  # the mask branch's logits hold the non-finite values
    if block == "residual_attention trunk":
        return [x, 3 * other]
    if block == "at_loss student":
        return [x, other]
    if block == "at_loss teacher":
        return [other, x]
    return [x]


def step(module, args, backend="reference"):
    """{name: tensor on CPU} of one forward and backward: y, every input's gradient, the
    parameters' gradients and the float buffers after the step."""
    args = [a.detach().clone().requires_grad_() for a in args]
    module.zero_grad(set_to_none=True)
    with attn_kernels.use_backend(backend):
        y = module(*args)
    dy = make_x(tuple(y.shape), seed=1) if y.dim() == 4 else torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(dy.to(y))
    out = {"y": y.detach()}
    out.update({f"d input {i}": a.grad for i, a in enumerate(args)})
    out.update({f"d {n}": p.grad for n, p in module.named_parameters()})
    out.update({n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return {k: v.cpu() if v is not None else None for k, v in out.items()}


def assert_same_nonfinite(name, got, want):
    if want is None or got is None:
        assert got is None and want is None, f"{name}: {got} vs {want}"
        return
    got = got.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    for what, fn in [("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)]:
        g, w = fn(got), fn(want)
        if not torch.equal(g, w):
            raise AssertionError(f"{name}: {what} at {g.nonzero().tolist()[:6]} ({int(g.sum())} in all), "
                                 f"eager's at {w.nonzero().tolist()[:6]} ({int(w.sum())} in all)")
    finite = torch.isfinite(want)
    scale = max(1.0, want[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5 * scale, msg=name)


@contextlib.contextmanager
def _native_cpu_convolution():
    """oneDNN (mkldnn) off, so that a float32 convolution on CPU runs PyTorch's native kernel
    (slow_conv2d), the one a float64 convolution always runs (oneDNN takes no float64), on every
    machine.

    A NaN in a padded conv's output gradient reaches every tap of its weight gradient where the
    kernel multiplies the zero padding by it (0 * NaN), and only the taps that meet real pixels
    where the kernel skips the padding. Which of the two happens is PyTorch's implementation
    choice, not the block's: its native kernel (im2col with explicit zeros) and oneDNN's AVX2 and
    gemm kernels multiply; oneDNN's AVX-512 backward-weights kernel (jit:avx512_core) skips. Eager
    runs in float64, always native; the block's float32 convolution on CPU (in the reference, and
    the aten.convolution_backward of the kernels' backward) took oneDNN. So with a -inf in a 4x5
    image under the official CBAM's 7x7 spatial conv, whose taps reach past the image, its weight
    gradient had NaN in all 98 taps from eager and in 51 from the block on an AVX-512 machine, in
    98 from both on an AVX2 one. Pinned, both sides run the same algorithm everywhere. On a GPU
    the block's convolution is cuDNN's, which this leaves as it is."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def check_block(block, train, backend):
    """Every planting through the block on `backend` vs its eager twin in float64 on CPU."""
    make, _ = BLOCKS[block]
    failures = []
    for planting in PLANTINGS:
        eager, fused = make()
        eager = eager.double().train(train)
        fused = fused.to(DEVICE).train(train)
        args = arguments(block, planted(planting))
        if backend != "reference":
            with attn_kernels.use_backend(backend):
                chosen = fused.dispatch(*args).backend if hasattr(fused, "dispatch") else \
                    attn_kernels.functional.at_map_dispatch(args[-1]).backend
            if chosen != backend:
                pytest.skip(f"{block} has no {backend} kernel")
        # PyTorch's native CPU convolution on both sides: see _native_cpu_convolution.
        with _native_cpu_convolution():
            want = step(eager, [a.double().cpu() for a in args])
            got = step(fused, args, backend)
        assert got.keys() == want.keys()
        for name in want:
            try:
                assert_same_nonfinite(name, got[name], want[name])
            except AssertionError as e:
                failures.append(f"[{planting}] {e}")
    assert not failures, "\n".join(failures)


def block_ids(v):
    return v if isinstance(v, str) else ("train" if v else "eval")


@pytest.mark.parametrize("block, train", BLOCK_MODES, ids=block_ids)
def test_kernels_as_eager(block, train, cpu_kernel_backend):
    check_block(block, train, cpu_kernel_backend)


@pytest.mark.parametrize("block, train", BLOCK_MODES, ids=block_ids)
def test_reference_as_eager(block, train):
    check_block(block, train, "reference")


@pytest.mark.parametrize("n", [1, 4], ids=["split", "tile"])
def test_attention_pool_gives_minus_inf_logits_weight_zero(n, cpu_kernel_backend):
    """GC's attention pooling: logits of -inf over whole splits of H*W (N = 1: the Triton grid
    splits the 64 pixels in four there) or over the first tile a program reads (N = 4: one split,
    two tiles of 32 pixels) get weight 0 next to finite logits, as in torch.softmax: only the
    channel holding the -inf gets a NaN context (0 * -inf), not the whole sample (exp(-inf - -inf)
    in the online softmax)."""
    from attn_kernels.ops.primitives import primitives

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1024, 8, 8, generator=g)
    weight = 0.05 * torch.randn(1024, generator=g)
    weight[5] = 0.5
    bias = torch.tensor([0.25])
    x[0, 5, :4] = -INF  # the first 32 of 64 pixels: their logits are -inf
    context, lse = primitives(cpu_kernel_backend, torch.device(DEVICE)).attention_pool(
        x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE))
    x64 = x.double().flatten(2)
    logits = (x64 * weight.double()[:, None]).sum(1) + bias.double()
    want = (x64 * torch.softmax(logits, -1)[:, None]).sum(-1)
    assert_same_nonfinite("context", context.cpu(), want)
    assert torch.isnan(context[0]).sum() == 1
    assert_same_nonfinite("lse", lse.cpu(), torch.logsumexp(logits, -1))
