"""attn_kernels.patch: every supported module, patched in place, computes what it computed before
(float64, on the Triton kernels) and keeps its parameters and state_dict; unpatch restores it; the
report says what was left alone and why; timm's models, patched, match themselves unpatched
within each dtype's tolerance, under autocast and in channels_last, and compile without a graph break.
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attn_kernels
from helpers import make_x

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import cbam as timm_cbam  # noqa: E402
from timm.models._efficientnet_blocks import SqueezeExcite  # noqa: E402


# ---- the papers' modules, as users copy them into their code (same names and structure) ----------

class BasicConv(nn.Module):
    """The CBAM code's conv unit: conv, optional BN (momentum 0.01), optional ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, padding=0, relu=True, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return self.relu(x) if self.relu is not None else x


class ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max")):
        super().__init__()
        self.gate_channels = gate_channels
        hidden = gate_channels // reduction_ratio
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(gate_channels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, gate_channels))
        self.pool_types = list(pool_types)

    def forward(self, x):
        pools = {"avg": F.avg_pool2d, "max": F.max_pool2d, "lp": lambda x, k: F.lp_pool2d(x, 2, k)}
        logits = sum(self.mlp(pools[p](x, tuple(x.shape[2:]))) for p in self.pool_types)
        return x * torch.sigmoid(logits)[:, :, None, None]


class SpatialGate(nn.Module):
    def __init__(self, relu=False):
        super().__init__()
        self.spatial = BasicConv(2, 1, 7, padding=3, relu=relu)

    def forward(self, x):
        pooled = torch.cat([torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16, pool_types=("avg", "max"), no_spatial=False):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio, pool_types)
        self.no_spatial = no_spatial
        if not no_spatial:
            self.SpatialGate = SpatialGate()

    def forward(self, x):
        x = self.ChannelGate(x)
        return x if self.no_spatial else self.SpatialGate(x)


class eca_layer(nn.Module):  # noqa: N801 (the ECA-Net code's name)
    def __init__(self, channel, k_size=3):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.avg_pool(x).squeeze(-1).transpose(-1, -2)
        y = self.conv(y).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


class ContextBlock(nn.Module):
    """mmcv.cnn.ContextBlock's structure and computation."""

    def __init__(self, in_channels, ratio, pooling_type="att", fusion_types=("channel_add",)):
        super().__init__()
        self.in_channels, self.ratio, self.planes = in_channels, ratio, int(in_channels * ratio)
        self.pooling_type, self.fusion_types = pooling_type, fusion_types
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(in_channels, 1, kernel_size=1)
            self.softmax = nn.Softmax(dim=2)
        else:
            self.avg_pool = nn.AdaptiveAvgPool2d(1)

        def transform():
            return nn.Sequential(nn.Conv2d(in_channels, self.planes, 1), nn.LayerNorm([self.planes, 1, 1]),
                                 nn.ReLU(inplace=True), nn.Conv2d(self.planes, in_channels, 1))

        self.channel_add_conv = transform() if "channel_add" in fusion_types else None
        self.channel_mul_conv = transform() if "channel_mul" in fusion_types else None

    def forward(self, x):
        n, c, h, w = x.shape
        if self.pooling_type == "att":
            weights = self.softmax(self.conv_mask(x).view(n, 1, h * w)).unsqueeze(-1)
            context = torch.matmul(x.view(n, 1, c, h * w), weights).view(n, c, 1, 1)
        else:
            context = self.avg_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


class ConvModule(nn.Module):
    """mmcv.cnn.ConvModule(in, out, 1) without norm and activation, as NonLocal2d builds its g, theta, phi."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.with_activation = False
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.conv(x)


class NonLocal2d(nn.Module):
    """mmcv.cnn.NonLocal2d (mmcv/cnn/bricks/non_local.py), written out for 'embedded_gaussian'
    and the 'dot_product' mode (which has no fused path)."""

    def __init__(self, in_channels, reduction=2, use_scale=True, mode="embedded_gaussian", sub_sample=False):
        super().__init__()
        self.in_channels, self.reduction, self.use_scale = in_channels, reduction, use_scale
        self.inter_channels = in_channels // reduction
        self.mode, self.sub_sample = mode, sub_sample
        self.g = ConvModule(in_channels, self.inter_channels)
        self.conv_out = ConvModule(self.inter_channels, in_channels)
        self.theta = ConvModule(in_channels, self.inter_channels)
        self.phi = ConvModule(in_channels, self.inter_channels)
        if sub_sample:
            self.g = nn.Sequential(self.g, nn.MaxPool2d(kernel_size=(2, 2)))
            self.phi = nn.Sequential(self.phi, nn.MaxPool2d(kernel_size=(2, 2)))

    def forward(self, x):
        n = x.size(0)
        g_x = self.g(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(n, self.inter_channels, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(n, self.inter_channels, -1)
        pairwise = torch.matmul(theta_x, phi_x)
        if self.mode == "dot_product":
            pairwise = pairwise / pairwise.shape[-1]
        else:
            if self.use_scale:
                pairwise = pairwise / theta_x.shape[-1] ** 0.5
            pairwise = pairwise.softmax(dim=-1)
        y = torch.matmul(pairwise, g_x).permute(0, 2, 1).contiguous().reshape(n, self.inter_channels, *x.size()[2:])
        return x + self.conv_out(y)


# ---- every supported module ------------------------------------------------------------------------

C = 32
MODULES = {
    "timm SEModule": lambda: timm.layers.SEModule(C),
    "timm SEModule add_maxpool silu": lambda: timm.layers.SEModule(C, add_maxpool=True, act_layer=nn.SiLU),
    "timm EffectiveSEModule": lambda: timm.layers.EffectiveSEModule(C),
    "timm EffectiveSEModule add_maxpool": lambda: timm.layers.EffectiveSEModule(C, add_maxpool=True),
    "timm SqueezeExcite (EfficientNet)": lambda: SqueezeExcite(C, act_layer=nn.SiLU),
    "timm SqueezeExcite (MobileNetV3)": lambda: SqueezeExcite(C, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU),
    "timm EcaModule": lambda: timm.layers.EcaModule(C),
    "timm EcaModule use_mlp": lambda: timm.layers.EcaModule(C, use_mlp=True),
    "timm CecaModule": lambda: timm.layers.CecaModule(C),
    "timm ChannelAttn": lambda: timm_cbam.ChannelAttn(C),
    "timm SpatialAttn": lambda: timm_cbam.SpatialAttn(),
    "timm CbamModule": lambda: timm_cbam.CbamModule(C),
    "timm LightChannelAttn": lambda: timm_cbam.LightChannelAttn(C),
    "timm LightSpatialAttn": lambda: timm_cbam.LightSpatialAttn(),
    "timm LightCbamModule": lambda: timm_cbam.LightCbamModule(C),
    "timm GlobalContext": lambda: timm.layers.GlobalContext(C),
    "timm GlobalContext gca": lambda: timm.layers.GlobalContext(C, fuse_add=True, fuse_scale=False),
    "torchvision SqueezeExcitation": lambda: torchvision.ops.SqueezeExcitation(C, 8),
    "torchvision SqueezeExcitation hardsigmoid": lambda: torchvision.ops.SqueezeExcitation(
        C, 8, scale_activation=nn.Hardsigmoid),
    "official CBAM": lambda: CBAM(C, reduction_ratio=4),
    "official CBAM max no_spatial": lambda: CBAM(C, reduction_ratio=4, pool_types=["max"], no_spatial=True),
    "official ChannelGate": lambda: ChannelGate(C, reduction_ratio=4),
    "official SpatialGate": lambda: SpatialGate(),
    "official eca_layer": lambda: eca_layer(C, k_size=5),
    "mmcv ContextBlock": lambda: ContextBlock(C, 1 / 4),
    "mmcv ContextBlock avg mul+add": lambda: ContextBlock(C, 1 / 4, "avg", ["channel_mul", "channel_add"]),
    "timm SelectiveKernel": lambda: timm.layers.SelectiveKernel(C),
    "timm SelectiveKernel 3 paths stride 2": lambda: timm.layers.SelectiveKernel(
        C, kernel_size=[3, 5, 7], split_input=False, stride=2),
    "timm NonLocalAttn": lambda: timm.layers.NonLocalAttn(C),
    "mmcv NonLocal2d": lambda: NonLocal2d(C),
    "mmcv NonLocal2d sub_sample": lambda: NonLocal2d(C, sub_sample=True, use_scale=False),
}
# The backend dispatch() names for a patched module, where it is not the one selected: non-local
# runs through SDPA, and Selective Kernel has Triton's kernels only.
BACKEND = {name: "sdpa" for name in MODULES if "NonLocal" in name}
BACKEND.update({name: "triton" for name in MODULES if "SelectiveKernel" in name})


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """model with every norm layer's affine parameters and statistics, and every all-zero
    parameter (zero-initialized last layers), drawn at random: timm zero-initializes the layers
    that feed or follow its attention modules, which would hide their errors."""
    g = torch.Generator().manual_seed(seed)

    def draw(t, low=None):
        r = torch.rand(t.shape, generator=g) + low if low is not None else torch.randn(t.shape, generator=g) * 0.1
        t.copy_(r.to(t.dtype))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    draw(m.weight, low=0.5)
                    draw(m.bias)
                if getattr(m, "running_var", None) is not None:
                    draw(m.running_mean)
                    draw(m.running_var, low=0.5)
        for p in model.parameters():
            if not p.any():
                draw(p)
    return model


def step(model, x, dy, backend="triton", call=None):
    """(output, x's gradient, every parameter's gradient and float buffer after the step); `call`
    runs the model in its place when given (a compiled model)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    with attn_kernels.use_backend(backend):
        y = (model if call is None else call)(x)
    y.backward(dy)
    state = {"y": y.detach(), "dx": x.grad}
    state.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    state.update({n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()})
    return state


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODULES)
def test_patched_module_computes_what_it_did(name, train, kernel_backend):
    torch.manual_seed(0)
    original = randomized(MODULES[name]()).double().train(train)
    keys = list(original.state_dict())
    patched = copy.deepcopy(original)
    tensors = [t.data_ptr() for t in patched.state_dict().values()]
    assert attn_kernels.patch(patched) is patched
    assert type(patched).__name__ == f"Fused{type(original).__name__}"
    assert isinstance(patched, type(original))
    assert list(patched.state_dict()) == keys
    assert [t.data_ptr() for t in patched.state_dict().values()] == tensors  # the same tensors, not copies
    x = make_x((2, C, 5, 6), dtype=torch.float64, seed=1)
    with attn_kernels.use_backend(kernel_backend):
        assert patched.dispatch(x).backend == BACKEND.get(name, kernel_backend), patched.dispatch(x)
    with torch.no_grad():
        dy = make_x(tuple(copy.deepcopy(original)(x).shape), dtype=torch.float64, seed=2)
    expected, got = step(original, x, dy, "reference"), step(patched, x, dy, kernel_backend)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)
    assert attn_kernels.unpatch(patched) is patched
    assert type(patched) is type(original)
    restored = step(patched, x, dy, "reference")
    assert all(torch.equal(restored[k], step(original, x, dy, "reference")[k]) for k in ("y", "dx"))


def test_patch_and_report_on_a_model():
    model = nn.Sequential(
        timm.layers.SEModule(C),
        timm_cbam.CbamModule(C),
        timm.layers.SEModule(C, act_layer=nn.Mish),           # no fused Mish
        timm.layers.GatherExcite(C, use_mlp=False),            # no fused version
        CBAM(C, reduction_ratio=4, pool_types=["avg", "lp"]),  # an official pool without a kernel
        nn.Conv2d(C, C, 1),
    )
    before = attn_kernels.patch_report(model)
    assert [e.status for e in before.entries] == ["patchable", "patchable", "left alone", "left alone", "left alone",
                                                  "left alone", "patchable"]
    attn_kernels.patch(model)
    report = attn_kernels.patch_report(model)
    by_name = {e.name: e for e in report.entries}
    assert by_name["0"].status == by_name["1"].status == "patched"
    assert "1.channel" not in by_name  # a patched CbamModule's forward does not call its halves
    assert "Mish" in by_name["2"].detail
    assert "no fused version" in by_name["3"].detail
    assert "pool_types ['avg', 'lp']" in by_name["4"].detail
    # The official CBAM is left alone, so its SpatialGate is patched on its own.
    assert by_name["4.SpatialGate"].status == "patched" and by_name["4.ChannelGate"].status == "left alone"
    assert "5" not in by_name
    text = str(report)
    assert text.startswith("attn_kernels.patch: 3 patched, 4 left alone") and "GatherExcite" in text
    attn_kernels.patch(model)  # patching twice changes nothing
    assert attn_kernels.patch_report(model) == report
    attn_kernels.unpatch(model)
    assert [e.status for e in attn_kernels.patch_report(model).entries] == [e.status for e in before.entries]


def test_report_says_why_a_module_is_left_alone():
    class OwnForward(timm.layers.SEModule):
        def forward(self, x):
            return 2 * super().forward(x)

    class SameForward(timm.layers.SEModule):
        pass

    model = nn.ModuleDict({
        "own": OwnForward(C), "same": SameForward(C), "bn": timm.layers.SEModule(C, norm_layer=nn.BatchNorm2d),
        "gc_nothing": timm.layers.GlobalContext(C, fuse_scale=False), "eca_k": eca_layer(C), "eca_bias": eca_layer(C),
        "mmcv_no_ln_affine": ContextBlock(C, 1 / 4), "spatial_relu": SpatialGate(relu=True),
        "dot_product": NonLocal2d(C, mode="dot_product"), "sk_mish": timm.layers.SelectiveKernel(C),
        "sk_attn": timm.layers.selective_kernel.SelectiveKernelAttn(C),
    })
    model["sk_mish"].attn.act = nn.Mish()
    model["eca_bias"].conv = nn.Conv1d(1, 1, 3, padding=1, bias=True)
    model["mmcv_no_ln_affine"].channel_add_conv[1] = nn.LayerNorm([8, 1, 1], elementwise_affine=False)
    details = {e.name: (e.status, e.detail) for e in attn_kernels.patch_report(model).entries}
    assert details["own"] == ("left alone", "a subclass of timm.layers.squeeze_excite.SEModule with its own forward")
    assert details["same"][0] == "patchable"
    assert details["bn"] == ("left alone", "norm layer BatchNorm2d between fc1 and act has no fused kernel")
    assert "nothing to fuse" in details["gc_nothing"][1]
    assert details["eca_k"][0] == "patchable"
    assert "bias=False" in details["eca_bias"][1]
    assert "LayerNorm([planes, 1, 1])" in details["mmcv_no_ln_affine"][1]
    assert "relu" in details["spatial_relu"][1]
    assert "mode 'dot_product'" in details["dot_product"][1]
    assert details["sk_mish"][0] == "left alone" and "attn.act" in details["sk_mish"][1]
    assert details["sk_attn"][0] == "patchable"
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        attn_kernels.patch(lambda x: x)


def test_patched_model_pickles_deep_copies_and_keeps_hooks():
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), timm.layers.SEModule(C), CBAM(C, reduction_ratio=4))
    randomized(model).eval()
    calls = []
    hook = model[1].register_forward_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attn_kernels.patch(model)
    assert calls == [] and optimizer.param_groups[0]["params"][2] is model[1].fc1.weight
    x = torch.randn(2, 3, 8, 8)
    with attn_kernels.use_backend("triton"):
        y = model(x)
    assert calls == [1]
    hook.remove()  # a lambda does not pickle
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [type(m).__name__ for m in other] == ["Conv2d", "FusedSEModule", "FusedCBAM"]
        with attn_kernels.use_backend("triton"):
            assert torch.equal(other(x), y)
        attn_kernels.unpatch(other)
        assert [type(m) for m in other] == [nn.Conv2d, timm.layers.SEModule, CBAM]


# ---- timm's models -----------------------------------------------------------------------------------

MODELS = {
    "seresnet50": {}, "seresnext50_32x4d": {}, "ecaresnet50d": {}, "gcresnet50t": {}, "efficientnet_b0": {},
    "mobilenetv3_large_100": {}, "regnety_016": {}, "resnet50_cbam": {"block_args": {"attn_layer": "cbam"}},
}


# One model per block with CUDA kernels, for the emulated CUDA backend.
EMULATED_MODELS = ("seresnet50", "ecaresnet50d", "gcresnet50t", "resnet50_cbam")


def create_model(name: str, size: int = 64, device: str = "cpu") -> nn.Module:
    """A timm model, initialized as timm does except for the parameters it zeroes (drawn at
    random, so that no attention module is hidden behind a zero), with BatchNorm statistics
    measured on random images of `size` pixels, as in a trained model, so that eval mode is as
    well conditioned as training."""
    torch.manual_seed(0)
    model = timm.create_model(name.removesuffix("_cbam"), pretrained=False, **MODELS[name]).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.1)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        for seed in range(4):
            model(make_x((8, 3, size, size), device=device, seed=100 + seed))
        for m in norms:
            m.momentum = 0.1
    return model


def relative_errors(states, reference):
    """Per tensor of a step: the L2 error against `reference` (the step in float64), divided by
    the largest reference norm of the step (the model's gradient scale): norms, not maxima,
    because a deep network amplifies single rounding differences by chance."""
    scale = max(t.double().norm().item() for t in reference.values())
    return {k: (states[k].double() - reference[k]).norm().item() / scale for k in reference}


EPS = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def check_model(name, train, dtype, layout, backend="triton", device="cpu", size=64, batch=8, compile=False):
    """The patched model vs itself unpatched, both measured against the unpatched model in float64;
    float16 and bfloat16 by autocast; with compile, the patched model through torch.compile with
    fullgraph=True (which raises on a graph break). A batch of 8 keeps training-mode BatchNorm well
    conditioned: with 2 images, fp16 rounding anywhere changes some gradients by tens of percent."""
    autocast = dtype != torch.float32
    model = create_model(name, size, device).train(train)
    model64 = copy.deepcopy(model).double()
    patched = attn_kernels.patch(copy.deepcopy(model))
    assert attn_kernels.patch_report(patched).with_status("patched")
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for m in (model, model64, patched):
        m.to(memory_format=memory_format)
    x = make_x((batch, 3, size, size), dtype=torch.float64, device=device, layout=layout, seed=1)
    dy = make_x((batch, 1000), dtype=torch.float64, device=device, seed=2)
    reference = step(model64, x, dy, "reference")
    param_dtype = torch.float32 if autocast else dtype
    x_in, dy_in = x.to(param_dtype), dy.to(param_dtype)
    model, patched = model.to(param_dtype), patched.to(param_dtype)
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        eager = step(model, x_in, dy_in, "reference")
        if compile:
            torch._dynamo.reset()
        fused = step(patched, x_in, dy_in, backend, call=torch.compile(patched, fullgraph=True) if compile else None)
    err_eager, err_fused = relative_errors(eager, reference), relative_errors(fused, reference)
    worst = max(reference, key=lambda k: err_fused[k] - 2 * err_eager[k])
    assert err_fused[worst] <= 2 * err_eager[worst] + EPS[dtype], (
        f"{worst}: patched error {err_fused[worst]:.3g} > 2 x unpatched error {err_eager[worst]:.3g} + {EPS[dtype]}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_timm_model_patched_equals_unpatched_float64(name, train, kernel_backend):
    if kernel_backend == "cuda" and (not train or name not in EMULATED_MODELS) and not torch.cuda.is_available():
        pytest.skip("emulated CUDA kernels: one model per block, in training mode, to keep the CPU test run "
                    "short (every block's paths are covered block by block)")
    model = create_model(name).double().train(train)
    patched = attn_kernels.patch(copy.deepcopy(model))
    x = make_x((2, 3, 64, 64), dtype=torch.float64, seed=1)
    dy = make_x((2, 1000), dtype=torch.float64, seed=2)
    expected, got = step(model, x, dy, "reference"), step(patched, x, dy, kernel_backend)
    # Gradients that are 0 in exact arithmetic (a GC add term's bias followed by BatchNorm, the
    # attention logits' bias) are rounding noise in eager: compare on the model's gradient scale.
    scale = max(t.norm().item() for t in expected.values())
    for key in expected:
        assert (got[key] - expected[key]).norm().item() <= 1e-10 * scale, key


# The Triton interpreter rounds float32 to bfloat16 toward zero (the GPU to nearest even): in eval
# mode that bias compounds over a model's depth, so bfloat16 in eval is left to the GPU tests
# (tests/test_gpu.py runs every combination on both kernel backends).
@pytest.mark.parametrize("train, dtype, layout, batch", [
    (True, torch.float32, "nchw", 2),
    (True, torch.bfloat16, "channels_last", 8),
    (False, torch.float16, "channels_last", 8),
], ids=["train-fp32-nchw", "train-autocast_bf16-cl", "eval-autocast_fp16-cl"])
@pytest.mark.parametrize("name", MODELS)
def test_timm_model_low_precision(name, train, dtype, layout, batch):
    """On the Triton kernels only: the CUDA kernels' low-precision numerics are held to the same
    rule block by block (test_se.py, test_cbam.py, ...), and whole models on the emulated CUDA
    kernels would add about ten minutes to every CPU test run."""
    check_model(name, train, dtype, layout, batch=batch)


@pytest.mark.parametrize("name", ["seresnet50", "resnet50_cbam"])
def test_timm_model_compiles_without_graph_break(name):
    """fullgraph=True raises on any graph break, in the attention modules or elsewhere."""
    model = attn_kernels.patch(create_model(name))
    x = make_x((2, 3, 32, 32), seed=1)
    torch._dynamo.reset()
    with attn_kernels.use_backend("triton"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        y = compiled(x)
        y.sum().backward()
        expected = model(x)
    torch.testing.assert_close(y, expected)
