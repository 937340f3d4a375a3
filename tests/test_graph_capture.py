"""Patched models under the tools model libraries use, the kinds of test timm's own model tests run
(its tests/test_models.py), each comparing the patched model with itself unpatched: forward and
backward; torch.fx tracing (timm's and torchvision's feature extraction) with backward through the
traced module; TorchScript; FX then TorchScript; features_only (hooks and FX); forward_intermediates;
torch.export with a static and a dynamic batch, saved and loaded. Models: timm's small test nets
with each of its attention layers, MobileNetV3 (timm's and torchvision's), and, for the modules no
model library builds (the papers' and mmcv's), a small net around each of them.

How each tool sees a fused module (attn_kernels.nn.FusedModule): torch.fx records it as one
call_module node, TorchScript compiles its original computation (with a warning), torch.export
records the fused op.
"""
import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

import attn_kernels
import attn_kernels.nn as fused_nn
from helpers import make_x

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from patchable import C, MODULES, randomized  # noqa: E402
from timm.layers import get_notrace_functions, get_notrace_modules  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402


# ---- the models ------------------------------------------------------------------------------------

# timm's attention layers (its create_attn names) in timm's small test ResNet: every block patch()
# fuses by class except torchvision's SE and the halves of CBAM, which come below.
TIMM_ATTN_LAYERS = ["se", "ese", "eca", "ceca", "cbam", "lcbam", "gc", "gca", "sk", "nl"]
TIMM_MODELS = {f"test_resnet_{a}": ("test_resnet", {"block_args": {"attn_layer": a}}) for a in TIMM_ATTN_LAYERS}
TIMM_MODELS["test_efficientnet"] = ("test_efficientnet", {})           # SqueezeExcite, SiLU
TIMM_MODELS["mobilenetv3_small_050"] = ("mobilenetv3_small_050", {})   # SqueezeExcite, hard sigmoid


def create_timm_model(name: str, **kwargs) -> nn.Module:
    arch, args = TIMM_MODELS[name]
    torch.manual_seed(0)
    return randomized(timm.create_model(arch, pretrained=False, num_classes=10, **args, **kwargs)).double()


class Net(nn.Module):
    """A stem conv, one attention module, a head: a model for the modules no library's model uses."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.block = block
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def create_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomized(Net(MODULES[name]())).double()


def patched_copy(model: nn.Module) -> nn.Module:
    patched = attn_kernels.patch(copy.deepcopy(model))
    assert attn_kernels.patch_report(patched).with_status("patched")
    return patched


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return make_x((batch, 3, size, size), dtype=torch.float64, seed=seed)


def patched_names(model: nn.Module):
    return [e.name for e in attn_kernels.patch_report(model).with_status("patched")]


def grads(model: nn.Module, x: torch.Tensor, call=None, backend="reference"):
    """(output, d x, every parameter's gradient) of a sum-of-squares loss, in training mode; the
    same seed for every call, so that dropout drops the same units."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with attn_kernels.use_backend(backend):
        y = (call or model)(x)
    y = y if isinstance(y, torch.Tensor) else next(iter(y.values()))
    (y.square().sum()).backward()
    return {"y": y.detach(), "dx": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


# PyTorch's own rounding at the model level, float64: the test models' reference forward and
# backward, run again in channels_last or on an input perturbed by one ulp, move the first convs'
# weight gradients (after every BatchNorm's backward) by up to 1.3e-11 of the tensor's largest
# element, 5e-9 of the element where it is small (test_resnet_gc, measured). The fused blocks'
# different summation order moves them as much, so each tensor's absolute tolerance is its scale
# times 1e-10 (8 times that noise), at least atol; a wrong kernel is off by far more.
SCALE_ATOL = 1e-10


def assert_same(got, expected, rtol=1e-9, atol=1e-11, name=None):
    """float64 throughout: the fused and original computations differ by rounding only."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for k in expected:
            assert_same(got[k], expected[k], rtol, atol, name=k)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_same(g, e, rtol, atol)
    else:
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(got, expected, rtol=rtol, atol=max(atol, SCALE_ATOL * scale),
                                   msg=lambda m: f"{name}: {m}" if name else m)


TIMM_TRACER = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}


def fx_model(model: nn.Module) -> nn.Module:
    """The model traced as timm's tests trace it: its last node returned through timm's (torchvision's)
    feature extraction, timm's untraceable modules and functions kept as leaves."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TIMM_TRACER)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TIMM_TRACER)


def scripted(model: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script(model), which warns once per fused module type that it compiles the original
    computation; the eager model is left as it was (still patched, same modules)."""
    before = [(name, type(m)) for name, m in model.named_modules()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        script = torch.jit.script(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    if any(isinstance(m, fused_nn.FusedModule) for m in model.modules()):
        assert any("compiles" in str(w.message) and "original computation" in str(w.message) for w in caught)
    return script


ALL_MODELS = [*TIMM_MODELS, "torchvision mobilenet_v3_small"]


def create(name: str) -> nn.Module:
    if name in TIMM_MODELS:
        return create_timm_model(name)
    torch.manual_seed(0)
    return randomized(torchvision.models.mobilenet_v3_small(num_classes=10)).double()


# ---- timm's test kinds on patched models ---------------------------------------------------------

@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name):
    model = create(name)
    patched = patched_copy(model)
    x = images()
    assert_same(patched.eval()(x), model.eval()(x))
    assert_same(grads(patched.train(), x), grads(model.train(), x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_trace_forward_and_backward(name):
    """Each patched module is one node of the traced graph (it runs the fused forward), in train and
    eval graphs; the traced module computes what the eager one does, and so do its gradients."""
    model = create(name)
    patched = patched_copy(model)
    train_nodes, eval_nodes = get_graph_node_names(patched, tracer_kwargs=TIMM_TRACER)
    for module_name in patched_names(patched):
        assert module_name in train_nodes and module_name in eval_nodes
        assert not any(n.startswith(module_name + ".") for n in train_nodes), "traced into a fused module"
    traced = fx_model(patched)
    x = images()
    assert_same(next(iter(traced.eval()(x).values())), model.eval()(x))
    assert_same(grads(traced.train(), x), grads(model.train(), x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_torchscript(name):
    model = create(name).eval()
    patched = patched_copy(model)
    x = images()
    assert_same(scripted(patched)(x), model(x))
    assert_same(patched(x), model(x))  # the eager model still runs (fused) after scripting


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_then_torchscript(name):
    model = create(name).eval()
    traced = fx_model(patched_copy(model)).eval()
    x = images()
    assert_same(next(iter(scripted(traced)(x).values())), model(x))


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_features_only(name):
    """timm's feature extraction by hooks (features_only=True, then patched) and by FX (the patched
    model wrapped in timm's FeatureGraphNet, which traces it: patch() cannot reach into a model
    traced before it was patched, test_patch_on_a_traced_model_says_what_it_could_not_patch)."""
    model = create_timm_model(name, features_only=True).eval()
    x = images()
    assert_same(patched_copy(model)(x), model(x))
    model = create_timm_model(name).eval()
    out_indices = tuple(range(len(model.feature_info)))
    expected = timm.models.FeatureGraphNet(model, out_indices)(x)
    assert_same(timm.models.FeatureGraphNet(patched_copy(model), out_indices)(x), expected)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_forward_intermediates(name):
    model = create_timm_model(name).eval()
    patched = patched_copy(model)
    x = images()
    final, intermediates = patched.forward_intermediates(x)
    expected_final, expected_intermediates = model.forward_intermediates(x)
    assert_same(final, expected_final)
    assert_same(intermediates, expected_intermediates)


def fused_ops(program) -> set:
    return {str(node.target) for node in program.graph.nodes if str(node.target).startswith("attn_kernels.")}


def check_export(model, patched, backend, batch=2, dynamic=True, size=32):
    """torch.export of the patched model: its graph holds the fused ops (on a kernel backend), and
    the program, saved and loaded, computes what the eager model does (at another batch, if dynamic)."""
    x = images(batch, size)
    with attn_kernels.use_backend(backend):
        program = torch.export.export(patched, (x,), dynamic_shapes=({0: Dim("batch")},) if dynamic else None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    x_run = images(batch + 1 if dynamic else batch, size, seed=3)
    with attn_kernels.use_backend(backend):
        assert_same(loaded.module()(x_run), model(x_run))
    return fused_ops(program)


# The fused op each timm attention layer's graph holds on a kernel backend (non-local attention is
# scaled_dot_product_attention, not an op of this package).
EXPORTED_OP = {"se": "channel_gate_forward", "ese": "channel_gate_forward", "eca": "channel_gate_forward",
               "ceca": "channel_gate_forward", "cbam": "cbam_forward", "lcbam": "cbam_forward", "gc": "gc_forward",
               "gca": "gc_forward", "sk": "selective_kernel_forward", "nl": None}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic_batch"])
@pytest.mark.parametrize("attn", TIMM_ATTN_LAYERS)
def test_export_holds_the_fused_ops(attn, dynamic):
    model = create_timm_model(f"test_resnet_{attn}").eval()
    ops = check_export(model, patched_copy(model), require_backend("triton"), dynamic=dynamic)
    op = EXPORTED_OP[attn]
    assert ops == ({f"attn_kernels.{op}.default"} if op else set())


@pytest.mark.parametrize("attn", ["se", "cbam", "gc"])
def test_export_on_the_cuda_kernels(attn):
    model = create_timm_model(f"test_resnet_{attn}").eval()
    ops = check_export(model, patched_copy(model), require_backend("cuda"))
    assert ops == {f"attn_kernels.{EXPORTED_OP[attn]}.default"}


def require_backend(backend: str) -> str:
    from conftest import HAS_GPU, require_cpu_backend

    if HAS_GPU:
        pytest.skip("runs the models on CPU tensors")
    return require_cpu_backend(backend)


@pytest.mark.parametrize("name", ["test_resnet_cbam", "test_resnet_gc"])
def test_fx_traced_model_on_the_kernels(name, kernel_backend):
    """The traced module's fused modules run the kernels: same forward and backward as eager."""
    if torch.cuda.is_available():
        pytest.skip("runs the models on CPU tensors")
    model = create_timm_model(name)
    traced = fx_model(patched_copy(model)).train()
    x = images()
    assert_same(grads(traced, x, backend=kernel_backend), grads(model.train(), x))


# ---- the modules no model library builds, in a small net ------------------------------------------

@pytest.mark.parametrize("name", MODULES)
def test_module_in_a_net_traces_scripts_and_exports(name):
    """FX (torch.fx.symbolic_trace itself), TorchScript where the unpatched net scripts (the papers'
    and mmcv's modules, as the tests write them, do not all), and torch.export, dynamic batch."""
    model = create_net(name).eval()
    patched = patched_copy(model)
    x = images(size=8)
    traced = torch.fx.symbolic_trace(patched)
    calls = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert set(patched_names(patched)) <= calls
    assert_same(traced(x), model(x))
    try:
        torch.jit.script(copy.deepcopy(model))
    except Exception as e:  # noqa: BLE001 (the original is not scriptable: neither is the patched net)
        with pytest.raises(type(e)):
            torch.jit.script(patched)
    else:
        assert_same(scripted(patched)(x), model(x))
    check_export(model, patched, "reference", size=8)


def test_script_failure_leaves_no_state():
    """A failed torch.jit.script of a patched model leaves nothing behind: the same patched classes
    script afterwards."""
    class Unscriptable(nn.Module):
        def forward(self, x):
            return (lambda y: y)(x)

    failing = attn_kernels.patch(nn.Sequential(timm.layers.SEModule(C), Unscriptable()))
    for _ in range(2):  # the same error twice, not "can't redefine method"
        with pytest.raises(Exception, match="Lambda"):
            torch.jit.script(failing)
    model = nn.Sequential(timm.layers.SEModule(C)).eval()
    x = make_x((2, C, 5, 5))
    assert_same(scripted(patched_copy(model))(x), model(x), rtol=1e-6, atol=1e-6)


def test_patch_on_a_traced_model_says_what_it_could_not_patch():
    """Tracing inlines an unpatched attention module into the graph: patch() on the GraphModule
    cannot reach it, and says so (warning and report)."""
    model = create_timm_model("test_resnet_se").eval()
    traced = torch.fx.symbolic_trace(model)
    with pytest.warns(UserWarning, match="traced through by torch.fx"):
        attn_kernels.patch(traced)
    report = attn_kernels.patch_report(traced)
    inlined = [e for e in report.entries if "traced through" in e.detail]
    assert {e.name for e in inlined} == {e.name for e in attn_kernels.patch_report(model).entries}
    assert all(e.status == "left alone" and e.original.endswith("SEModule") for e in inlined)
    # Traced after patching, the fused modules are calls of the graph, as patched as before.
    traced = torch.fx.symbolic_trace(patched_copy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn_kernels.patch(traced)
    assert len(attn_kernels.patch_report(traced).with_status("patched")) == len(patched_names(patched_copy(model)))


# ---- the drop-ins of attn_kernels.nn: their TorchScript computation is their fused one ------------

DROP_INS = {
    "FusedSE": lambda: fused_nn.FusedSE(C, add_maxpool=True),
    "FusedEffectiveSE": lambda: fused_nn.FusedEffectiveSE(C, add_maxpool=True),
    "FusedSqueezeExcite": lambda: fused_nn.FusedSqueezeExcite(C, act_layer=nn.SiLU),
    "FusedSqueezeExcitation": lambda: fused_nn.FusedSqueezeExcitation(C, 8, scale_activation=nn.Hardsigmoid),
    "FusedECA": lambda: fused_nn.FusedECA(C),
    "FusedECA use_mlp": lambda: fused_nn.FusedECA(C, use_mlp=True),
    "FusedCECA": lambda: fused_nn.FusedCECA(C),
    "FusedECAOfficial": lambda: fused_nn.FusedECAOfficial(C, k_size=5),
    "FusedChannelAttn": lambda: fused_nn.FusedChannelAttn(C),
    "FusedSpatialAttn": lambda: fused_nn.FusedSpatialAttn(),
    "FusedCBAM": lambda: fused_nn.FusedCBAM(C),
    "FusedLightChannelAttn": lambda: fused_nn.FusedLightChannelAttn(C),
    "FusedLightSpatialAttn": lambda: fused_nn.FusedLightSpatialAttn(),
    "FusedLightCBAM": lambda: fused_nn.FusedLightCBAM(C),
    "FusedCBAMOfficial": lambda: fused_nn.FusedCBAMOfficial(C, reduction_ratio=4),
    "FusedCBAMOfficial max no_spatial": lambda: fused_nn.FusedCBAMOfficial(C, 4, pool_types=["max"], no_spatial=True),
    "FusedGC": lambda: fused_nn.FusedGC(C),
    "FusedGC add, mean": lambda: fused_nn.FusedGC(C, use_attn=False, fuse_add=True),
    "FusedContextBlock": lambda: fused_nn.FusedContextBlock(C, 1 / 4),
    "FusedContextBlock avg mul+add": lambda: fused_nn.FusedContextBlock(C, 1 / 4, "avg", ["channel_mul", "channel_add"]),
    "FusedSelectiveKernel": lambda: fused_nn.FusedSelectiveKernel(C),
    "FusedSelectiveKernelAttn": lambda: fused_nn.FusedSelectiveKernelAttn(C),
    "FusedSAM": lambda: fused_nn.FusedSAM(C),
    "FusedSAM spatial": lambda: fused_nn.FusedSAM(C, spatial=True),
    "FusedNonLocalAttn": lambda: fused_nn.FusedNonLocalAttn(C),
    "FusedNonLocal2d": lambda: fused_nn.FusedNonLocal2d(C),
    "FusedNonLocal2d sub_sample BN": lambda: fused_nn.FusedNonLocal2d(C, sub_sample=True, norm_cfg={"type": "BN"}),
}
INPUT_SHAPES = {"FusedSelectiveKernelAttn": (2, 2, C, 6, 6)}  # the stacked paths; (2, C, 6, 6) for the others


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", DROP_INS)
def test_drop_in_scripts_and_traces(name, train):
    """A drop-in's reference_forward (what TorchScript runs, and torch.fx traces for a root module)
    computes what its fused forward does, BatchNorm statistics included."""
    torch.manual_seed(0)
    module = randomized(DROP_INS[name]()).double().train(train)
    x = make_x(INPUT_SHAPES.get(name, (2, C, 6, 6)), dtype=torch.float64, seed=1)
    expected = copy.deepcopy(module)(x)
    assert_same(scripted(copy.deepcopy(module))(x), expected)
    with pytest.warns(UserWarning, match="traces .* by itself"):
        traced = torch.fx.symbolic_trace(copy.deepcopy(module))
    assert_same(traced(x), expected)
    in_a_net = torch.fx.symbolic_trace(nn.Sequential(nn.Identity(), copy.deepcopy(module)))
    assert "1" in {n.target for n in in_a_net.graph.nodes if n.op == "call_module"}
    assert_same(in_a_net(x), expected)


def test_residual_attention_scripts_and_traces():
    module = fused_nn.FusedResidualAttention()
    trunk, logits = make_x((2, C, 5, 5), dtype=torch.float64, seed=1), make_x((2, C, 5, 5), dtype=torch.float64, seed=2)
    expected = module(trunk, logits)
    assert_same(scripted(module)(trunk, logits), expected)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.combine = fused_nn.FusedResidualAttention()

        def forward(self, trunk, logits):
            return self.combine(trunk, logits)

    traced = torch.fx.symbolic_trace(TwoInputs())
    assert "combine" in {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert_same(traced(trunk, logits), expected)
