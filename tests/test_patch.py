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
from torch import nn

import attn_kernels
from helpers import make_x

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from patchable import C, CBAM, MODULES, ContextBlock, NonLocal2d, SpatialGate, eca_layer, randomized  # noqa: E402
from timm.layers import cbam as timm_cbam  # noqa: E402


# The backend dispatch() names for a patched module, where it is not the one selected: non-local
# runs through SDPA, and Selective Kernel has Triton's kernels only.
BACKEND = {name: "sdpa" for name in MODULES if "NonLocal" in name}
BACKEND.update({name: "triton" for name in MODULES if "SelectiveKernel" in name})


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
def test_patched_module_computes_what_it_did(name, train, cpu_kernel_backend):
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
    with attn_kernels.use_backend(cpu_kernel_backend):
        assert patched.dispatch(x).backend == BACKEND.get(name, cpu_kernel_backend), patched.dispatch(x)
    with torch.no_grad():
        dy = make_x(tuple(copy.deepcopy(original)(x).shape), dtype=torch.float64, seed=2)
    expected, got = step(original, x, dy, "reference"), step(patched, x, dy, cpu_kernel_backend)
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


# One model per set of kernels and gate, for the low-precision whole-model tests on the CPU: SE,
# ECA and EfficientNet's SE share the channel-gate kernels (ECA differs in the per-sample mix only,
# float64-tested with the rest), so ecaresnet50d, seresnext50_32x4d and regnety_016 are left out.
LOW_PRECISION_MODELS = ("seresnet50", "gcresnet50t", "efficientnet_b0", "mobilenetv3_large_100", "resnet50_cbam")
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
@pytest.mark.parametrize("name", LOW_PRECISION_MODELS)
def test_timm_model_low_precision(name, train, dtype, layout, batch):
    """On the Triton kernels only: the CUDA kernels' low-precision numerics are held to the same
    rule block by block (test_se.py, test_cbam.py, ...), and whole models on the emulated CUDA
    kernels would add about ten minutes to every CPU test run. LOW_PRECISION_MODELS at 48 pixels
    keep the CPU run short."""
    check_model(name, train, dtype, layout, batch=batch, size=48)


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
