"""SE: reference vs timm, kernels vs reference, gradients, the op contract, bad input.

Kernel tests run the 'triton' backend in Triton's interpreter on CPU where there is no GPU, and
both kernel backends on the GPU where there is one (tests marked `gpu`).
"""
import pytest
import torch
from torch import nn

import attn_kernels
from attn_kernels import functional as F
from attn_kernels.ops.channel_gate import channel_gate_backward, channel_gate_forward
from conftest import require_cpu_backend
from helpers import (
    FAST_GRADCHECK, check_compiles_without_graph_break, check_kernel_against_reference, make_pair, make_x, run,
    check_launch_budget, saved_for_backward, timm_layers,
)

# (description, shape, SE constructor kwargs, x kind): small shapes for the interpreter.
SAMPLES = [
    ("odd sizes", (2, 13, 5, 7), {}, "normal"),
    ("H*W = 1", (3, 16, 1, 1), {}, "normal"),
    ("H = 1", (2, 12, 1, 9), {}, "normal"),
    ("maxpool, post-ReLU ties", (2, 12, 6, 5), {"add_maxpool": True}, "relu"),
    ("maxpool, quantized ties", (2, 10, 4, 4), {"add_maxpool": True}, "quantized"),
    ("maxpool, zero planes", (2, 9, 3, 5), {"add_maxpool": True}, "zero_planes"),
    ("no bias, silu", (2, 24, 4, 3), {"bias": False, "act_layer": "silu"}, "normal"),
    ("gelu, hard_sigmoid gate", (1, 8, 5, 5), {"act_layer": nn.GELU, "gate_layer": "hard_sigmoid"}, "normal"),
    ("tanh gate, rd_channels", (2, 6, 3, 4), {"rd_channels": 3, "gate_layer": "tanh"}, "normal"),
    ("N = 0", (0, 8, 4, 4), {}, "normal"),
]
LAYOUTS = ["nchw", "channels_last"]


def sample_inputs(dtype=torch.float32, device="cpu", layouts=LAYOUTS):
    """Yields (id, x, kwargs) for every sample and layout."""
    for name, shape, kwargs, kind in SAMPLES:
        for layout in layouts:
            yield f"{name}/{layout}", make_x(shape, dtype, device, layout, kind), kwargs


# ---- the reference is timm ------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [{}, {"add_maxpool": True}, {"bias": False}, {"rd_ratio": 0.25, "rd_divisor": 4}, {"act_layer": "silu"},
     {"norm_layer": nn.BatchNorm2d}, {"act_layer": nn.Mish}, {"gate_layer": "hard_sigmoid"}],
    ids=str,
)
def test_reference_backend_matches_timm_bitwise(kwargs):
    eager, fused = make_pair("se", 32, **kwargs)
    x = make_x((2, 32, 5, 6), kind="relu")
    dy = make_x((2, 32, 5, 6), seed=1)
    y_e, dx_e, g_e = run(eager, x, dy)
    y_f, dx_f, g_f = run(fused, x, dy, backend="reference")
    assert torch.equal(y_e, y_f) and torch.equal(dx_e, dx_f)
    for name in g_e:
        assert torch.equal(g_e[name], g_f[name]), name


@pytest.mark.parametrize(
    "kwargs", [{}, {"rd_ratio": 1 / 8, "rd_divisor": 1}, {"rd_channels": 7}, {"bias": False}, {"norm_layer": nn.BatchNorm2d}],
    ids=str,
)
def test_state_dict_loads_both_ways(kwargs):
    eager = timm_layers.SEModule(40, **kwargs)
    fused = attn_kernels.FusedSE(40, **kwargs)
    assert list(eager.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(fused.state_dict(), strict=True)
    assert fused.fc1.out_channels == eager.fc1.out_channels


def test_repr_names_the_shape():
    assert "channels=64, rd_channels=8, add_maxpool=False" in repr(attn_kernels.FusedSE(64))


# ---- kernels vs reference -------------------------------------------------------------------

@pytest.mark.parametrize("sample", list(sample_inputs()), ids=lambda s: s[0])
def test_kernel_matches_reference(sample, poisoned, cpu_kernel_backend):
    if torch.cuda.is_available():
        pytest.skip("covered at real shapes by the GPU tests")
    _, x, kwargs = sample
    check_kernel_against_reference(cpu_kernel_backend, x, "se", kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_kernel_dtypes(dtype, poisoned, cpu_kernel_backend):
    if torch.cuda.is_available():
        pytest.skip("covered at real shapes by the GPU tests")
    for layout in LAYOUTS:
        check_kernel_against_reference(cpu_kernel_backend, make_x((2, 24, 5, 7), dtype, layout=layout), "se", {"add_maxpool": True})


def test_reductions_split_over_hw(monkeypatch, poisoned):
    """Force several H*W splits per (n, c), so partial results are combined; compare exactly."""
    from attn_kernels.triton import channel_gate

    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    monkeypatch.setattr(channel_gate, "TARGET_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(channel_gate, "_TILE_ELEMENTS", 16)
    for layout in LAYOUTS:
        x = make_x((2, 3, 20, 21), torch.float64, layout=layout, kind="quantized")
        dy = make_x((2, 3, 20, 21), torch.float64, layout=layout, seed=2)
        mean, xmax = channel_gate.channel_pool(x, True)
        torch.testing.assert_close(mean, x.mean((2, 3)), rtol=0, atol=1e-14)
        assert torch.equal(xmax, x.amax((2, 3)))
        dot, ties, _ = channel_gate.channel_grad_reduce(dy, x, xmax)
        torch.testing.assert_close(dot, (dy * x).sum((2, 3)), rtol=0, atol=1e-12)
        assert torch.equal(ties, (x == xmax[:, :, None, None]).sum((2, 3)).double())
        dot, no_ties, dy_sum = channel_gate.channel_grad_reduce(dy, x, None, True)  # GC's reduction
        torch.testing.assert_close(dot, (dy * x).sum((2, 3)), rtol=0, atol=1e-12)
        torch.testing.assert_close(dy_sum, dy.sum((2, 3)), rtol=0, atol=1e-12)
        assert no_ties.numel() == 0


@pytest.mark.parametrize("block, kwargs, shape", [
    ("se", {"add_maxpool": True}, (3, 20, 7, 6)), ("se", {"rd_channels": 3}, (3, 20, 7, 6)),
    ("se", {"rd_channels": 72, "add_maxpool": True}, (2, 80, 3, 3)),  # C and R over a 64-wide chunk
    ("channel_attn", {}, (3, 20, 7, 6)), ("eca", {}, (3, 20, 7, 6)), ("eca", {"use_mlp": True}, (3, 20, 7, 6)),
    ("ceca", {}, (3, 20, 7, 6)),
], ids=str)
def test_excitation_in_the_last_program_of_many(block, kwargs, shape, monkeypatch, poisoned):
    """Triton: several programs per sample (channel tiles in NCHW, H*W splits in channels_last), so
    the last one folds partials written by the others and computes the excitation from them; the
    per-sample counters are left at zero for the next launch."""
    from attn_kernels.triton import channel_gate, excite

    if torch.cuda.is_available():
        pytest.skip("interpreter test")
    monkeypatch.setattr(channel_gate, "TARGET_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(channel_gate, "_TILE_ELEMENTS", 16)
    for layout in LAYOUTS:
        x = make_x(shape, torch.float64, layout=layout, kind="quantized")
        programs, splits = excite._plan(x, 1).grid
        assert programs * splits >= 2 * x.shape[0]  # several programs per sample
        check_kernel_against_reference("triton", x, block, kwargs)
    assert not excite._tickets[x.device].any()


def emulated_launches(fn):
    """(kernel name, grid x) of every CUDA-emulation launch fn() makes."""
    log = torch.ops.attn_kernels_emulated._launch_log
    log(True)
    try:
        fn()
    finally:
        lines = log(False).splitlines()
    return [(line.split("\t")[0], int(line.split("\t")[1].split(",")[0])) for line in lines]


@pytest.mark.parametrize("block, kwargs", [("se", {"add_maxpool": True}), ("se", {"rd_channels": 3}),
                                           ("channel_attn", {}), ("eca", {}), ("eca", {"use_mlp": True}),
                                           ("ceca", {})], ids=str)
def test_cuda_excitation_in_the_last_block_of_many(block, kwargs, poisoned):
    """CUDA (emulated): several blocks per sample (channel tasks and H*W splits), so the last block
    to take a ticket folds partials written by the others and computes (and differentiates) the
    excitation from them; float64 against the reference, and the per-sample counters are left
    at zero for the next launch."""
    backend = require_cpu_backend("cuda")
    if torch.cuda.is_available():
        pytest.skip("emulation test")
    N = 2
    for layout in LAYOUTS:
        x = make_x((N, 24, 23, 25), torch.float64, layout=layout, kind="quantized")
        launches = emulated_launches(lambda: check_kernel_against_reference(backend, x, block, kwargs))
        grids = {name.split("<")[0]: grid for name, grid in launches if "excite_kernel" in name}
        assert grids["pool_excite_kernel"] >= 6 * N and grids["grad_excite_kernel"] >= 6 * N  # blocks per sample
    assert not torch.ops.attn_kernels_emulated._sample_tickets().any()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [65535, 65536])
def test_cuda_excitation_at_the_grid_limit(N, layout, monkeypatch, poisoned):
    """pool_excite and grad_excite with one block per sample: N at and past 65535, the limit of a
    grid's y and z dimensions (samples run along x, whose limit is 2^31 - 1). The launches are
    validated whole; only the first and last blocks run (ATTN_KERNELS_EMULATION_GRID=edges), and
    their samples are checked against the reference excitation, forward and backward."""
    from attn_kernels.ops.excite import excite, excite_backward

    require_cpu_backend("cuda")
    if torch.cuda.is_available():
        pytest.skip("emulation test")
    ops = torch.ops.attn_kernels_emulated
    monkeypatch.setenv("ATTN_KERNELS_EMULATION_GRID", "edges")
    edges = [0, 1, N - 2, N - 1]
    x = make_x((N, 2, 1, 2), torch.float64, layout=layout, kind="quantized")
    dy = make_x((N, 2, 1, 2), torch.float64, layout=layout, seed=1)
    torch.manual_seed(0)
    w1, b1, w2, b2 = (torch.randn(shape, dtype=torch.float64) for shape in ((1, 2, 1, 1), (1,), (2, 1, 1, 1), (2,)))
    config = ("avg+max", "mlp", "relu", "sigmoid")
    gate, mean, xmax = ops.pool_excite(x, w1, b1, w2, b2, *config)
    x_edges = x[edges]
    mean_ref, xmax_ref = x_edges.mean((2, 3)), x_edges.amax((2, 3))
    torch.testing.assert_close(mean[edges], mean_ref, rtol=0, atol=1e-15)
    assert torch.equal(xmax[edges], xmax_ref)
    e = excite("mlp", "avg+max", mean_ref, xmax_ref, w1, b1, w2, b2, "relu", "sigmoid")
    torch.testing.assert_close(gate[edges], e.gate, rtol=1e-14, atol=1e-15)

    gate, bias, tie, *_ = ops.grad_excite(dy, x, w1, b1, w2, b2, mean, xmax, *config)
    dot = (dy[edges] * x_edges).sum((2, 3))
    dmean, dmax, *_ = excite_backward("mlp", "avg+max", e, dot, w1, b1, w2, b2, "relu", "sigmoid")
    ties = (x_edges == xmax_ref[:, :, None, None]).sum((2, 3))
    torch.testing.assert_close(gate[edges], e.gate, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(bias[edges], dmean / 2, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(tie[edges], dmax / ties, rtol=1e-13, atol=1e-15)
    assert gate[2:N - 2].isnan().all()  # the blocks that did not run left their output poisoned
    assert not ops._sample_tickets().any()


# The launch budget of issue 26 for the channel-gate blocks: forward <= 2, backward <= 3 (our
# kernels plus every aten op that launches a kernel on a GPU), every parameter gradient included.
CHANNEL_GATE_BLOCKS = {
    "SEModule": lambda c: attn_kernels.FusedSE(c),
    "SEModule add_maxpool": lambda c: attn_kernels.FusedSE(c, add_maxpool=True),
    "EffectiveSEModule": lambda c: attn_kernels.FusedEffectiveSE(c),
    "SqueezeExcite": lambda c: attn_kernels.FusedSqueezeExcite(c),
    "SqueezeExcitation": lambda c: attn_kernels.FusedSqueezeExcitation(c, c // 4),
    "EcaModule": lambda c: attn_kernels.FusedECA(c),
    "EcaModule use_mlp": lambda c: attn_kernels.FusedECA(c, use_mlp=True),
    "CecaModule": lambda c: attn_kernels.FusedCECA(c),
    "ChannelAttn": lambda c: attn_kernels.FusedChannelAttn(c),
}


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("block", list(CHANNEL_GATE_BLOCKS))
def test_triton_launch_budget_at_resnet50_shapes(block):
    check_launch_budget(CHANNEL_GATE_BLOCKS[block], "triton", forward=2, backward=3)


# ---- gradients, op contract -----------------------------------------------------------------

@pytest.mark.parametrize("add_maxpool", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(add_maxpool, layout, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_x((2, 6, 3, 4), torch.float64, device, layout).requires_grad_()
    torch.manual_seed(0)
    w1, w2 = torch.randn(3, 6, 1, 1, dtype=torch.float64, device=device), torch.randn(6, 3, 1, 1, dtype=torch.float64, device=device)
    b1, b2 = torch.randn(3, dtype=torch.float64, device=device), torch.randn(6, dtype=torch.float64, device=device)
    params = [t.requires_grad_() for t in (w1, b1, w2, b2)]

    def f(x, w1, b1, w2, b2):
        return F.se(x, w1, b1, w2, b2, add_maxpool=add_maxpool, act="silu")

    with attn_kernels.use_backend(kernel_backend):
        assert F.gate_dispatch(x, act="silu").backend == kernel_backend
        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=FAST_GRADCHECK)


def op_args(backend="triton", pool="mix", device="cpu"):
    x = make_x((2, 8, 3, 5), device=device, kind="quantized")
    torch.manual_seed(0)
    w1, b1 = torch.randn(4, 8, 1, 1, device=device), torch.randn(4, device=device)
    w2, b2 = torch.randn(8, 4, 1, 1, device=device), torch.randn(8, device=device)
    return x, w1, b1, w2, b2, pool, "mlp", "relu", "sigmoid", backend


@pytest.mark.parametrize("pool", ["avg", "mix", "avg+max", "max"])
def test_opcheck(pool, kernel_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = op_args(kernel_backend, pool, device)
    # The ops have no derivative of their own: autograd is ChannelGate around them (the gradcheck
    # tests cover it), so they are checked on inputs that do not require grad.
    tensors = args[:5]
    torch.library.opcheck(channel_gate_forward, (*tensors, *args[5:]))
    _, mean, xmax = channel_gate_forward(*tensors, *args[5:])
    dy = torch.randn_like(args[0])
    torch.library.opcheck(channel_gate_backward, (dy, *tensors, mean, xmax, *args[5:]))


def test_compile_fullgraph_has_no_graph_break():
    check_compiles_without_graph_break(make_pair("se", 16)[1], 16)


def test_saves_only_x_and_per_channel_statistics(cpu_kernel_backend):
    """Backward keeps x plus O(N*C) tensors (and the tiny weights): nothing else the size of x."""
    x = make_x((2, 32, 8, 8)).requires_grad_()
    _, fused = make_pair("se", 32, add_maxpool=True)
    saved = saved_for_backward(fused, x, cpu_kernel_backend)
    activation_sized = [t for t in saved if t.numel() >= x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0].data_ptr() == x.data_ptr()
    params = sum(p.numel() for p in fused.parameters())
    assert sum(t.numel() for t in saved) <= x.numel() + params + 4 * x.shape[0] * x.shape[1]


def test_deterministic_bitwise(cpu_kernel_backend):
    x = make_x((2, 24, 9, 7), kind="relu")
    dy = make_x((2, 24, 9, 7), seed=3)
    _, fused = make_pair("se", 24, add_maxpool=True)
    first = run(fused, x, dy, cpu_kernel_backend)
    second = run(fused, x, dy, cpu_kernel_backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


# ---- dispatch and bad input -----------------------------------------------------------------

@pytest.mark.cpu_kernels
def test_dispatch_says_why():
    _, fused = make_pair("se", 8)
    x = make_x((1, 8, 3, 3))
    choice = fused.dispatch(x)
    assert choice.backend == "reference" and "'auto' sends non-CUDA tensors" in choice.passed_over["cuda"]
    with attn_kernels.use_backend("cuda"):
        choice = fused.dispatch(x)
        if attn_kernels.backends.cuda_emulation_error() is None:  # the CUDA kernels, emulated on CPU
            assert choice.backend == "cuda" and choice.emulated
            assert str(choice) == "backend: cuda (CUDA kernels under CPU emulation)"
        elif not torch.cuda.is_available():
            assert choice.backend == "triton" and "x is on cpu" in choice.passed_over["cuda"]
            assert "ATTN_KERNELS_BUILD_EMULATION=1" in choice.passed_over["cuda"]
            assert str(choice).startswith("backend: triton\n  not cuda: ")
    mish = attn_kernels.FusedSE(8, act_layer=nn.Mish)
    with attn_kernels.use_backend("triton"):
        choice = mish.dispatch(x)
        assert choice.backend == "reference" and "Mish" in choice.passed_over["triton"]
        strided = make_x((1, 8, 6, 6))[:, :, ::2]
        choice = fused.dispatch(strided)
        assert choice.backend == "reference" and "strides" in choice.passed_over["triton"]
        eager, _ = make_pair("se", 8)
        torch.testing.assert_close(fused(strided), eager(strided), rtol=0, atol=0)


def test_backend_selection_api():
    assert attn_kernels.get_backend() == "auto"
    with attn_kernels.use_backend("reference"):
        assert attn_kernels.get_backend() == "reference"
    assert attn_kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        attn_kernels.set_backend("cudnn")


def test_environment_variable_selects_and_is_validated():
    import subprocess
    import sys

    code = "import attn_kernels; print(attn_kernels.get_backend())"
    env = dict(__import__("os").environ, ATTN_KERNELS_BACKEND="triton")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "triton", out.stderr
    env["ATTN_KERNELS_BACKEND"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "environment variable ATTN_KERNELS_BACKEND" in out.stderr


@pytest.mark.parametrize(
    "make_input, error, message",
    [
        (lambda: torch.randn(2, 8, 4), ValueError, "x must be 4-D"),
        (lambda: torch.randn(2, 9, 4, 4), ValueError, "x has 9 channels"),
        (lambda: torch.ones(2, 8, 4, 4, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
        (lambda: torch.randn(2, 8, 0, 4), ValueError, "H\\*W >= 1"),
        (lambda: [1.0], TypeError, "x must be a tensor"),
    ],
)
def test_bad_input_names_the_argument(make_input, error, message):
    fused = attn_kernels.FusedSE(8)
    for backend in ["triton", "reference", "auto"]:
        with attn_kernels.use_backend(backend), pytest.raises(error, match=message):
            fused(make_input())


def test_bad_weights_name_the_argument():
    x = torch.randn(2, 8, 4, 4)
    w1, w2 = torch.randn(2, 8, 1, 1), torch.randn(8, 2, 1, 1)
    with pytest.raises(ValueError, match="fc2_weight must have shape \\(8, 2, 1, 1\\)"):
        F.se(x, w1, None, torch.randn(8, 3, 1, 1), None)
    with pytest.raises(ValueError, match="fc1_bias must have shape \\(2,\\)"):
        F.se(x, w1, torch.randn(3), w2, None)
    with pytest.raises(ValueError, match="fc1_weight is on meta but x is on cpu"):
        F.se(x, w1.to("meta"), None, w2, None)
    with pytest.raises(ValueError, match="act must be one of"):
        F.se(x, w1, None, w2, None, act="swishy")
    with pytest.raises(ValueError, match="channels must be a positive int"):
        attn_kernels.FusedSE(0)


def test_unknown_activation_name_without_timm(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm.layers", None)  # makes `from timm.layers import ...` fail
    with pytest.raises(ValueError, match="act_layer='swishy' is not a known activation name"):
        attn_kernels.FusedSE(8, act_layer="swishy")
