"""Inputs, module pairs and comparisons shared by the block tests."""
import copy

import pytest
import torch

import attn_kernels

timm_layers = pytest.importorskip("timm.layers")

# Per-dtype floor of the allowed error, in units of the reference's magnitude: lets a comparison
# pass where PyTorch's own error happens to be ~0 (e.g. exactly representable results).
EPS = {torch.float64: 1e-13, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# gradcheck's fast mode (a random projection of the Jacobian, which a wrong gradient fails as
# surely) where the kernels run interpreted or emulated on the CPU, one launch per Jacobian column
# otherwise; the full Jacobian on a GPU.
FAST_GRADCHECK = not torch.cuda.is_available()


def make_x(shape, dtype=torch.float32, device="cpu", layout="nchw", kind="normal", seed=0):
    """An activation of `shape` in the given layout. kinds with ties in the max: 'relu' (post-ReLU
    zeros), 'quantized' (few distinct values), 'zero_planes' (whole (n, c) planes of zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "relu":
        x = x.clamp_min(0)
    elif kind == "quantized":
        x = (x * 2).round() / 2
    elif kind == "zero_planes":
        x[:, ::2] = 0
    x = x.to(dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def assert_close_to_reference(name, out, eager, reference):
    """`out` (kernel at a low precision) must be within twice the error of PyTorch's own `eager`
    computation at that precision, both measured against a float64 `reference`."""
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != {eager.dtype}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    ref = reference.double()
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    eager_err = (eager.double() - ref).abs().max().item() if out.numel() else 0.0
    floor = EPS[out.dtype] * max(1.0, ref.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * eager_err + floor, f"{name}: error {err:.3g} > 2 x eager error {eager_err:.3g} + {floor:.3g}"


# block name -> (timm module, drop-in), constructed with the same arguments.
BLOCKS = {
    "se": (lambda *a, **k: timm_layers.SEModule(*a, **k), attn_kernels.FusedSE),
    "channel_attn": (lambda *a, **k: timm_layers.cbam.ChannelAttn(*a, **k), attn_kernels.FusedChannelAttn),
    "spatial_attn": (lambda *a, **k: timm_layers.cbam.SpatialAttn(*a, **k), attn_kernels.FusedSpatialAttn),
    "cbam": (lambda *a, **k: timm_layers.cbam.CbamModule(*a, **k), attn_kernels.FusedCBAM),
    "eca": (lambda *a, **k: timm_layers.EcaModule(*a, **k), attn_kernels.FusedECA),
    "ceca": (lambda *a, **k: timm_layers.CecaModule(*a, **k), attn_kernels.FusedCECA),
    "gc": (lambda *a, **k: timm_layers.GlobalContext(*a, **k), attn_kernels.FusedGC),
}


def block_args(block, channels):
    """The positional constructor arguments of a block for x with `channels` channels."""
    return () if block == "spatial_attn" else (channels,)


def randomized(module):
    """module with random, non-trivial parameters and BN statistics (from torch's global generator)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return module


def make_pair(block, *args, dtype=torch.float32, device="cpu", seed=0, train=True, init=None, **kwargs):
    """timm's module and its drop-in holding the same random, non-trivial parameters and BN
    statistics (then `init(module)`, when given), both in train or eval mode."""
    make_eager, make_fused = BLOCKS[block]
    torch.manual_seed(seed)
    eager = randomized(make_eager(*args, **kwargs))
    if init is not None:
        init(eager)
    eager = eager.to(device=device, dtype=dtype).train(train)
    fused = make_fused(*args, **kwargs).to(device=device, dtype=dtype).train(train)
    fused.load_state_dict(eager.state_dict(), strict=True)
    return eager, fused


def run(module, x, dy, backend=None):
    """(y, x.grad, parameter grads and float buffers after the step) of one forward and backward."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    if backend is None:
        y = module(x)
    else:
        with attn_kernels.use_backend(backend):
            y = module(x)
    y.backward(dy)
    state = {n: p.grad for n, p in module.named_parameters()}
    state.update({n: b.clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return y.detach(), x.grad, state


def check_kernel_against_reference(backend, x, block="se", kwargs=None, train=True, init=None):
    """Kernel output, gradients and updated BN statistics vs a float64 reference, within twice
    eager PyTorch's error at x's dtype (parameters as make_pair draws them, `init` after)."""
    eager, fused = make_pair(block, *block_args(block, x.shape[1]), dtype=x.dtype, device=x.device, train=train,
                             init=init, **(kwargs or {}))
    eager64 = copy.deepcopy(eager).double()  # the same (rounded) parameters, computed in float64
    dy = make_x(tuple(x.shape), x.dtype, x.device, seed=1)
    if not x.is_contiguous():
        dy = dy.contiguous(memory_format=torch.channels_last)
    y_ref, dx_ref, s_ref = run(eager64, x.double(), dy.double())
    y_e, dx_e, s_e = run(eager, x, dy)
    y_k, dx_k, s_k = run(fused, x, dy, backend)
    with attn_kernels.use_backend(backend):
        assert fused.dispatch(x).backend == backend
    assert_close_to_reference("y", y_k, y_e, y_ref)
    assert_close_to_reference("dx", dx_k, dx_e, dx_ref)
    assert s_ref.keys() == s_k.keys()
    for name in s_ref:
        assert_close_to_reference(name, s_k[name], s_e[name], s_ref[name])
    # Outputs keep x's memory format: no hidden copy into another layout.
    assert y_k.stride() == x.stride() and dx_k.stride() == x.stride()


def saved_for_backward(module, x, backend):
    """The tensors autograd saves for backward in one forward of module on x."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with attn_kernels.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


def check_compiles_without_graph_break(fused, channels):
    """fused between two layers, compiled with fullgraph=True (which raises on any graph break),
    forward and backward on the kernel backend; the output equals eager's. Returns (compiled
    model, an eager copy taken before the step) for further checks."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "cuda" if torch.cuda.is_available() else "triton"
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), fused, torch.nn.ReLU()).to(device)
    reference_model = copy.deepcopy(model)
    x = make_x((2, channels, 6, 6), device=device)
    torch._dynamo.reset()
    with attn_kernels.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True)
        y = compiled(x.requires_grad_())
        y.sum().backward()
    torch.testing.assert_close(y, reference_model(x.detach()))
    return model, reference_model


def check_against_rewrite(module, x, semantics, params):
    """A float64 module on the triton backend vs `semantics(x)`, an independent float64 rewrite of
    the code the module mirrors, computed with `params` (leaf tensors named as the module's
    parameters): outputs, x's gradient and every parameter's gradient."""
    dy = torch.randn_like(x)
    x_rewrite = x.clone().requires_grad_()
    expected = semantics(x_rewrite)
    expected.backward(dy)
    x_module = x.clone().requires_grad_()
    with attn_kernels.use_backend("triton"):
        assert module.dispatch(x_module).backend == "triton"
        y = module(x_module)
    y.backward(dy)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_module.grad, x_rewrite.grad, rtol=1e-10, atol=1e-12)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-11, msg=name)


def check_empty_batch(module, channels):
    """N = 0 gives an empty output, an empty x gradient and zero parameter gradients, on the
    kernel backends that run here and on the reference."""
    probe = torch.empty(1, channels, 1, 1)
    for backend in [b for b in ("triton", "cuda") if attn_kernels.backends.unavailable_reason(b, probe) is None] + ["reference"]:
        x = torch.randn(0, channels, 4, 4, requires_grad=True)
        with attn_kernels.use_backend(backend):
            y = module(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        for name, p in module.named_parameters():
            assert torch.equal(p.grad, torch.zeros_like(p)), f"{backend}: {name}"
        module.zero_grad(set_to_none=True)


def run_in_processes(worker, world_size: int, *args, timeout: float = 180.0) -> None:
    """worker(rank, world_size, port, *args) in `world_size` spawned processes that can join a gloo
    process group on localhost (a free port each time). Fails with the first traceback if one
    raises, and kills them all and fails if they are not done after `timeout` seconds: a collective
    that waits forever must fail a test, not hang it."""
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(worker, args=(world_size, port, *args), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} processes still running after {timeout:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def init_process_group(rank: int, world_size: int, port: int) -> None:
    """In a run_in_processes worker: join the gloo group on localhost, one torch thread per process."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # localhost only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


class SkippedTritonLaunches:
    """A context in which interpreted Triton kernels are recorded, not run: `take()` returns the
    names of the kernels launched since the last take. For counting launches at real shapes,
    where running the interpreter would take hours."""

    def __init__(self):
        self._launched = []

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._run = InterpretedFunction.run
        InterpretedFunction.run = lambda fn, *args, grid, warmup, **kwargs: self._launched.append(fn.__name__)
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run

    def take(self):
        launched, self._launched = self._launched, []
        return launched


RESNET50_STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # (C, H = W) of each stage


def check_launch_budget(make_block, backend: str, forward: int, backward: int, kernels=(2, 3)):
    """Issue 26's launch budget of a block: at every ResNet-50 stage, N = 32 and 128, bf16 and fp32,
    both layouts, in training, a forward of make_block(C) launches at most `forward` kernels and
    GPU-launching aten ops, a backward (every parameter gradient included) at most `backward`, and
    exactly `kernels` (forward, backward) of ours. The kernels are recorded, not run: Triton's in
    the interpreter (SkippedTritonLaunches), the CUDA ones in the emulation's launch log."""
    import itertools

    from attn_kernels.host_cost import count_directions, emulated_cuda_launches

    for (channels, size), n, dtype, layout in itertools.product(
            RESNET50_STAGES, (32, 128), (torch.bfloat16, torch.float32), ("nchw", "channels_last")):
        fused = make_block(channels).to(dtype).train()
        memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.empty(n, channels, size, size, dtype=dtype).to(memory_format=memory_format).requires_grad_()
        recorded = SkippedTritonLaunches() if backend == "triton" else emulated_cuda_launches()
        with attn_kernels.use_backend(backend), recorded as launched:
            assert fused.dispatch(x).backend == backend
            fused(x).backward(torch.empty_like(x))  # the first call allocates the per-sample counters
            counts = count_directions(fused, x, torch.empty_like(x), launched)
        case = f"{channels}x{size}x{size} N={n} {dtype} {layout}"
        assert counts["fwd"]["launches"] <= forward and counts["fwd"]["kernels"] == kernels[0], (case, counts)
        assert counts["bwd"]["launches"] <= backward and counts["bwd"]["kernels"] == kernels[1], (case, counts)
