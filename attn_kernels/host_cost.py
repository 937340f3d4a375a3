"""Host cost: the time the CPU spends to enqueue a fused block's forward and backward, against the
eager module it replaces, with the kernel bodies skipped; and per direction the launches, aten ops
and Python calls that time is made of (issue 26; DESIGN.md "Op contract" 10, "Benchmark protocol").

    python -m attn_kernels.host_cost                      # every block, both kernel backends
    python -m attn_kernels.bench --host --blocks se cbam --backends triton --pairs 500
    python -m attn_kernels.host_cost --shape 8x256x14x14 --dtype bf16 --layout nchw --csv out.csv

Everything runs on CPU tensors, in training mode, with the kernels launched as on a GPU but not run:
- backend 'cuda': the kernels of csrc/ under their CPU emulation with ATTN_KERNELS_EMULATION_GRID=none
  (each launch validated and logged, no block run; the emulation reads the variable at each launch);
- backend 'triton': Triton's active driver replaced by a stand-in for the CUDA driver (device 0,
  stream 0, target sm_90) whose launcher is a counting no-op. `JITFunction.run` (binding,
  specialization, cache lookup) and `CompiledKernel` run as on a GPU; the kernels compile once for
  sm_90a into Triton's on-disk cache, which needs no GPU. TRITON_INTERPRET must be unset.
The aten ops (eager's, and the fused path's around its kernels) run on the CPU for real: at the
default small shape an elementwise op or reduction computes in about a microsecond, less than its
dispatch; convolutions (SK's branches, SAM's, DCN's eager im2col) cost more, so those blocks' times
are not host time alone.

Time: eager and fused forward+backward alternated in one process (eager, fused, eager, ...), after a
warm-up; the medians of each and the median of the per-pair ratios fused/eager. The machine may
be shared and noisy: pairs compare the two under the same conditions. Times are reported, never
asserted.

Counts per direction ('fwd': module(x); 'bwd': y.backward(dy)): launches (our kernels, plus every
aten op that would launch a kernel on a GPU, classified as the ledger does: views, metadata ops and
allocations launch nothing), our kernels, aten ops (all, views included), calls of our own ops
(the attn_kernels namespaces), Python function calls (sys.setprofile 'call' events), and for the
Triton backend the calls of JITFunction.run. `count_direction_launches` gives them without timing.

Differences from a GPU's host path that these figures do not include: a device guard and
`get_device_properties` where a launcher asks a CUDA tensor for its device (the launchers take
their CPU branches here); the C launch itself (cuLaunchKernel, a few microseconds); the caching
allocator. The CUDA emulation adds its own small per-launch work (validation, logging).
"""
import argparse
import contextlib
import csv
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attn_kernels
from attn_kernels import backends
from attn_kernels.bench import BLOCKS, DTYPES, LAYOUTS, git_commit
from attn_kernels.ledger import make_input, op_traffic

DIRECTIONS = ("fwd", "bwd")
KERNEL_BACKENDS = ("cuda", "triton")
DEFAULT_SHAPE = (2, 64, 8, 8)  # N, C, H, W: small, so that the host's work dominates eager's CPU compute
DEFAULT_PAIRS = 200
WARMUP_PAIRS = 20
# An H100's SMs: the Triton launchers size their grids (and choose their splits) for them; on CPU
# tensors they read this variable where a GPU would be asked.
H100_SMS = 132
# The target the kernels compile for and the driver's stand-in reports: an H100's sm_90.
TARGET_ARCH, WARP_SIZE = 90, 32
OUR_NAMESPACES = ("attn_kernels", "attn_kernels_emulated")
COUNTS = ("launches", "kernels", "aten_ops", "our_ops", "python_calls", "jit_runs")
DEVICE = "cpu (kernel bodies skipped)"


# ---- the kernels, launched but not run --------------------------------------------------------------

class HostCostError(RuntimeError):
    """A block or backend that cannot be measured here, and why."""


class StubbedTritonDriver:
    """A stand-in for Triton's CUDA driver: device 0, stream 0, target sm_90, and a launcher that
    counts each launch and runs nothing. It sits where CompiledKernel gets its launcher
    (`launcher_cls`, and the C entry point `utils.launch` behind it), so that a launch through
    `kernel[grid](...)`, a cached CompiledKernel's `run(...)` or its launcher is counted the same.
    One per process (see stubbed_triton_driver): the compiled kernels keep the launchers it made."""

    def __init__(self):
        from triton.runtime import driver as driver_config

        self.launched: List[str] = []  # kernel names, in launch order
        driver = self

        def launched(name: str):
            if driver_config._active is not driver:
                raise HostCostError(f"{name} was compiled under the stubbed Triton driver and launched outside it")
            driver.launched.append(name)

        class Launcher:
            """Made by CompiledKernel._init_handles per compiled kernel; called with the grid, the
            stream, the function handle, metadata, hooks and the kernel's arguments, whose number and
            order differ between Triton versions: all accepted, none used."""

            def __init__(self, src, metadata):
                self.name = metadata.name

            def __call__(self, *args, **kwargs):
                launched(self.name)

        class Utils:
            def load_binary(self, name, kernel, shared, device):
                # (module, function, registers, spills, max threads): non-zero handles, since
                # CompiledKernel loads again while its module handle is None.
                return 1, 1, 0, 0, 1024

            def get_device_properties(self, device):
                # An H100's: the shared memory a block may opt into (the compiler's check), its SMs.
                return {"max_shared_mem": 232448, "multiprocessor_count": H100_SMS, "max_num_regs": 65536,
                        "warpSize": WARP_SIZE}

            def launch(self, *args, **kwargs):
                launched("<driver.utils.launch>")

        self.launcher_cls = Launcher
        self.utils = Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)

    def take(self) -> List[str]:
        launched, self.launched = self.launched, []
        return launched


_stub_driver: Optional[StubbedTritonDriver] = None


@contextlib.contextmanager
def stubbed_triton_driver():
    """Triton's kernels launched through StubbedTritonDriver, and the triton backend chosen for CPU
    tensors; yields the driver (its `take()`: the kernels launched since the last take)."""
    if os.environ.get("TRITON_INTERPRET"):
        raise HostCostError("TRITON_INTERPRET is set: triton.jit made interpreted kernels, not compiled ones; "
                            "measure the Triton backend's host cost in a process started without it")
    from triton.runtime import driver as driver_config

    global _stub_driver
    if _stub_driver is None:
        _stub_driver = StubbedTritonDriver()
    stub = _stub_driver
    stub.take()
    previous = getattr(driver_config, "_active", None)  # None: created from the real driver when next asked
    driver_config.set_active(stub)
    try:
        with mock.patch.object(backends, "triton_interpreted", lambda: True), \
                mock.patch.dict(os.environ, {"ATTN_KERNELS_INTERPRETER_SMS": str(H100_SMS)}):
            yield stub
    finally:
        driver_config.set_active(previous)


class EmulatedLaunchLog:
    """The CUDA emulation's launch log (one line per launch, the kernel's name first)."""

    def __enter__(self):
        torch.ops.attn_kernels_emulated._launch_log(True)
        return self

    def __exit__(self, *exc):
        torch.ops.attn_kernels_emulated._launch_log(False)

    def take(self) -> List[str]:
        return [line.split("\t", 1)[0] for line in torch.ops.attn_kernels_emulated._launch_log(True).splitlines()]


@contextlib.contextmanager
def emulated_cuda_launches():
    """The csrc kernels on CPU tensors under their emulation, each launch validated and logged and
    no block run; yields the launch log."""
    why = backends.cuda_emulation_error()
    if why is not None:
        raise HostCostError(why)
    # Read at each launch: one thread order (a second one would copy the outputs), no block run.
    skipped = {"ATTN_KERNELS_EMULATION_GRID": "none", "ATTN_KERNELS_EMULATION_ORDERS": "forward"}
    with mock.patch.dict(os.environ, skipped), EmulatedLaunchLog() as log:
        yield log


@contextlib.contextmanager
def kernel_bodies_skipped(backend: str):
    """`backend` selected, its kernels launched and not run; yields an object whose `take()` lists
    the kernels launched since the last take."""
    skipped = {"cuda": emulated_cuda_launches, "triton": stubbed_triton_driver}
    if backend not in skipped:
        raise ValueError(f"backend must be one of {', '.join(skipped)}, got {backend!r}")
    with skipped[backend]() as launches, attn_kernels.use_backend(backend):
        yield launches


# ---- counting: launches, aten ops, Python calls -----------------------------------------------------

class _OpCounter(TorchDispatchMode):
    """Counts the ops dispatched under it; runs our own ops below this mode's dispatch key with a
    fresh counter seeing the ops they call (on a GPU, their allocations and fills launch too)."""

    def __init__(self, counts: Dict[str, int]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in OUR_NAMESPACES:
            self.counts["our_ops"] += 1
            with _OpCounter(self.counts):
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        self.counts["aten_ops"] += 1
        self.counts["launches"] += any(op_traffic(func, args, kwargs, out))
        return out


class _JITRunCounter:
    """Counts JITFunction.run calls while entered: the proof that Triton's launch path ran."""

    def __init__(self):
        self.calls = 0

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        run = JITFunction.run
        counter = self

        def counted_run(jit_function, *args, **kwargs):
            counter.calls += 1
            return run(jit_function, *args, **kwargs)

        self._patch = mock.patch.object(JITFunction, "run", counted_run)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        self._patch.__exit__(*exc)

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _python_calls(run: Callable[[], object]) -> Tuple[int, object]:
    """(Python function calls made by run(), its result): sys.setprofile's 'call' events."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return calls - 1, result  # less the call of run itself


def _clear_grads(module: torch.nn.Module, x: torch.Tensor):
    x.grad = None
    for p in module.parameters():
        p.grad = None


def count_directions(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, kernels=None,
                     with_jit_runs: bool = False) -> Dict[str, Dict[str, int]]:
    """Exact counts per direction of y = module(x) ('fwd') and y.backward(dy) ('bwd'): launches,
    our kernels (`kernels.take()`: the names launched since the last take; None: no kernels),
    aten ops, our ops, Python calls, and with_jit_runs, JITFunction.run calls. Python calls are
    counted in a second run, without the counters of the first."""
    counts = {d: dict.fromkeys(COUNTS, 0) for d in DIRECTIONS}
    jit_runs = _JITRunCounter() if with_jit_runs else contextlib.nullcontext()
    _clear_grads(module, x)
    if kernels is not None:
        kernels.take()  # launched before: not this count's
    with jit_runs:
        with _OpCounter(counts["fwd"]):
            y = module(x)
        fwd_kernels = kernels.take() if kernels is not None else []
        fwd_jit = jit_runs.take() if with_jit_runs else 0
        with _OpCounter(counts["bwd"]):
            y.backward(dy)
        bwd_kernels = kernels.take() if kernels is not None else []
        bwd_jit = jit_runs.take() if with_jit_runs else 0
    for direction, launched, jit in (("fwd", fwd_kernels, fwd_jit), ("bwd", bwd_kernels, bwd_jit)):
        counts[direction]["kernels"] = len(launched)
        counts[direction]["launches"] += len(launched)
        counts[direction]["jit_runs"] = jit
    _clear_grads(module, x)
    counts["fwd"]["python_calls"], y = _python_calls(lambda: module(x))
    counts["bwd"]["python_calls"], _ = _python_calls(lambda: y.backward(dy))
    _clear_grads(module, x)
    if kernels is not None:
        kernels.take()
    return counts


# ---- one block --------------------------------------------------------------------------------------

@dataclass
class Setup:
    """A block's eager and fused modules (same state_dict), training mode, and their input."""
    eager: torch.nn.Module
    fused: torch.nn.Module
    x: torch.Tensor
    dy: torch.Tensor


def make_setup(block_name: str, shape=DEFAULT_SHAPE, dtype: str = "fp32", layout: str = "channels_last") -> Setup:
    torch.manual_seed(0)
    block = BLOCKS[block_name]
    n, c, h, w = shape
    eager = block.eager(c).to(DTYPES[dtype]).train()
    fused = block.fused(c).to(DTYPES[dtype]).train()
    fused.load_state_dict(eager.state_dict(), strict=True)  # both compute the same function
    x = make_input(n, c, h, w, DTYPES[dtype], layout).requires_grad_()  # an activation: training needs dx
    with torch.no_grad():
        dy = torch.randn_like(eager(x))  # the output's shape and layout
    return Setup(eager, fused, x, dy)


def fallback_reason(block_name: str, setup: Setup, backend: str) -> Optional[str]:
    """Why the fused module does not run `backend`'s kernels on the input (under
    kernel_bodies_skipped(backend)), or None."""
    if backend not in BLOCKS[block_name].fused_impls:
        return f"the benchmark's {block_name} has no {backend} implementation"
    choice = setup.fused.dispatch(setup.x)
    if choice.backend != backend:
        return choice.passed_over.get(backend, f"it runs on {choice.backend}")
    return None


def require_kernels(counts: Dict[str, Dict[str, int]], block_name: str, backend: str):
    """Fails unless the fused path launched `backend`'s kernels: with none, it fell back, or (Triton)
    its kernels were interpreted ones, which never reach the driver."""
    if not any(counts[d]["kernels"] for d in DIRECTIONS):
        raise HostCostError(f"{block_name}: no {backend} kernel reached the skipped launch (a fallback, or "
                            "Triton kernels made with TRITON_INTERPRET set when triton was imported)")


def _forward_backward(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    module(x).backward(dy)


def _warmed_up_counts(block_name: str, backend: str, setup: Setup, kernels) -> Dict[str, Dict[str, Dict[str, int]]]:
    """{'eager': counts, 'fused': counts} of count_directions after a warm-up (Triton compiles, plans
    are cached), under kernel_bodies_skipped(backend), whose launches `kernels` are."""
    why = fallback_reason(block_name, setup, backend)
    if why is not None:
        raise HostCostError(f"{block_name} does not run {backend} kernels here: {why}")
    for _ in range(2):
        _forward_backward(setup.eager, setup.x, setup.dy)
        _forward_backward(setup.fused, setup.x, setup.dy)
    counts = {"eager": count_directions(setup.eager, setup.x, setup.dy),
              "fused": count_directions(setup.fused, setup.x, setup.dy, kernels, with_jit_runs=backend == "triton")}
    require_kernels(counts["fused"], block_name, backend)
    return counts


def count_direction_launches(block_name: str, backend: str, shape=DEFAULT_SHAPE, dtype: str = "fp32",
                             layout: str = "channels_last", impl: str = "fused") -> Dict[str, Dict[str, int]]:
    """count_directions of one block's fused module on `backend`'s kernels (skipped), or of its
    eager module (impl='eager'), after a warm-up; no timing."""
    if impl not in ("eager", "fused"):
        raise ValueError(f"impl must be 'fused' or 'eager', got {impl!r}")
    setup = make_setup(block_name, shape, dtype, layout)
    with kernel_bodies_skipped(backend) as kernels:
        return _warmed_up_counts(block_name, backend, setup, kernels)[impl]


@dataclass
class Timed:
    eager_us: float   # medians over the pairs
    fused_us: float
    ratio: float      # median of the pairs' fused/eager
    pairs: int


def time_pairs(setup: Setup, pairs: int = DEFAULT_PAIRS, warmup: int = WARMUP_PAIRS) -> Timed:
    """Forward+backward of eager and fused alternated, `warmup` pairs then `pairs` timed; the
    backend and its skipped kernels are the caller's (kernel_bodies_skipped)."""
    eager, fused = [], []
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one member of a pair would be noise, not the block's cost
    try:
        for _ in range(warmup + pairs):
            for module, times in ((setup.eager, eager), (setup.fused, fused)):
                _clear_grads(module, setup.x)
                start = time.perf_counter_ns()
                _forward_backward(module, setup.x, setup.dy)
                times.append((time.perf_counter_ns() - start) / 1e3)
    finally:
        if collecting:
            gc.enable()
    eager, fused = eager[warmup:], fused[warmup:]
    return Timed(statistics.median(eager), statistics.median(fused),
                 statistics.median(f / e for f, e in zip(fused, eager)), pairs)


@dataclass
class Measured:
    block: str
    backend: str
    timed: Timed
    counts: Dict[str, Dict[str, Dict[str, int]]]  # impl ('eager', 'fused') -> direction -> count


def measure(block_name: str, backend: str, shape=DEFAULT_SHAPE, dtype: str = "fp32", layout: str = "channels_last",
            pairs: int = DEFAULT_PAIRS) -> Measured:
    setup = make_setup(block_name, shape, dtype, layout)
    with kernel_bodies_skipped(backend) as kernels:
        counts = _warmed_up_counts(block_name, backend, setup, kernels)
        timed = time_pairs(setup, pairs)
    return Measured(block_name, backend, timed, counts)


# ---- output -----------------------------------------------------------------------------------------

CSV_COLUMNS = [
    "block", "backend", "impl", "median_us", "eager_median_us", "fused_median_us", "ratio_fused_over_eager",
    *(f"{count}_{d}" for count in COUNTS for d in DIRECTIONS),
    "shape", "dtype", "layout", "pairs", "device", "cpu", "torch", "triton", "commit", "date",
]


def csv_rows(m: Measured, shape, dtype: str, layout: str, environment: dict) -> List[dict]:
    rows = []
    for impl in ("eager", "fused"):
        rows.append({
            "block": m.block, "backend": m.backend, "impl": impl,
            "median_us": f"{m.timed.eager_us if impl == 'eager' else m.timed.fused_us:.1f}",
            "eager_median_us": f"{m.timed.eager_us:.1f}", "fused_median_us": f"{m.timed.fused_us:.1f}",
            "ratio_fused_over_eager": f"{m.timed.ratio:.3f}",
            **{f"{count}_{d}": m.counts[impl][d][count] for count in COUNTS for d in DIRECTIONS},
            "shape": "x".join(map(str, shape)), "dtype": dtype, "layout": layout, "pairs": m.timed.pairs,
            **environment,
        })
    return rows


TABLE_FORMAT = ("{:<11} {:<7} {:>9} {:>9} {:>6}  {:>8} {:>9} {:>11} {:>9}  {:>8} {:>9} {:>11}")
TABLE_HEADER = ("block", "backend", "eager us", "fused us", "ratio", "launch f", "aten f", "py calls f",
                "kernels f", "launch e", "aten e", "py calls e")


def table_line(m: Measured) -> str:
    def per_direction(impl, count):
        c = m.counts[impl]
        return f"{c['fwd'][count]}/{c['bwd'][count]}"

    return TABLE_FORMAT.format(
        m.block, m.backend, f"{m.timed.eager_us:.0f}", f"{m.timed.fused_us:.0f}", f"{m.timed.ratio:.2f}",
        per_direction("fused", "launches"), per_direction("fused", "aten_ops"),
        per_direction("fused", "python_calls"), per_direction("fused", "kernels"),
        per_direction("eager", "launches"), per_direction("eager", "aten_ops"), per_direction("eager", "python_calls"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import triton

    return {"device": DEVICE, "cpu": cpu_model(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---- the command ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m attn_kernels.host_cost", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    kernel_blocks = [b for b, block in BLOCKS.items() if set(block.fused_impls) & set(KERNEL_BACKENDS)]
    add("--blocks", nargs="+", choices=sorted(BLOCKS), default=kernel_blocks,
        help="blocks to measure (default: every block with kernels: %(default)s)")
    add("--backends", nargs="+", choices=KERNEL_BACKENDS, default=list(KERNEL_BACKENDS),
        help="kernel backends of the fused path (default: both)")
    add("--pairs", type=int, default=DEFAULT_PAIRS, help="timed eager/fused pairs per block (default: %(default)s)")
    add("--shape", default="x".join(map(str, DEFAULT_SHAPE)), help="NxCxHxW (default: %(default)s)")
    add("--dtype", choices=sorted(DTYPES), default="fp32", help="(default: %(default)s)")
    add("--layout", choices=list(LAYOUTS), default="channels_last", help="(default: %(default)s)")
    add("--csv", default=os.path.join("benchmarks", "results", "host_cost.csv"),
        help="CSV written, one row per block, backend and implementation (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.shape = tuple(int(v) for v in args.shape.lower().split("x"))
        assert len(args.shape) == 4 and min(args.shape) > 0
    except (ValueError, AssertionError):
        p.error(f"--shape: NxCxHxW with positive sizes, got {args.shape}")
    if args.pairs < 1:
        p.error(f"--pairs must be positive, got {args.pairs}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") and "triton" in args.backends:
        # The compiled kernels' launch path is measured: triton must be imported without the
        # interpreter, so in a fresh process.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "attn_kernels.host_cost", *argv], env=env)
    start = time.perf_counter()
    run_info = environment()
    shape = "x".join(map(str, args.shape))
    print(f"Host cost on {run_info['cpu']}, kernel bodies skipped: shape {shape}, {args.dtype}, {args.layout}, "
          f"training; {args.pairs} pairs eager/fused (fwd+bwd), medians; torch {run_info['torch']}, "
          f"triton {run_info['triton']}, commit {run_info['commit']}", flush=True)
    measured, failures = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a GPU's host path is one thread; eager's small CPU ops gain nothing from more
    try:
        for block in args.blocks:
            for backend in args.backends:
                try:
                    m = measure(block, backend, args.shape, args.dtype, args.layout, args.pairs)
                except HostCostError as e:
                    print(f"[{time.perf_counter() - start:4.0f} s] {block} {backend}: skipped: {e}", flush=True)
                    continue
                except Exception as e:  # noqa: BLE001 (reported with its block; the others go on)
                    failures.append(f"{block} {backend}: {type(e).__name__}: {e}")
                    print(f"[{time.perf_counter() - start:4.0f} s] {block} {backend}: FAILED {failures[-1]}",
                          flush=True)
                    continue
                measured.append(m)
                print(f"[{time.perf_counter() - start:4.0f} s] {block} {backend}: eager {m.timed.eager_us:.0f} us, "
                      f"fused {m.timed.fused_us:.0f} us, ratio {m.timed.ratio:.2f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    print("\nus: median host time of one forward+backward; ratio: median of the pairs' fused/eager. "
          "Counts fwd/bwd; f: fused, e: eager;\nlaunches: our kernels + aten ops that launch on a GPU; "
          "aten: every aten op (views included); kernels: ours.\nThe aten ops compute for real on the CPU: where "
          "they include convolutions (sk, sam, sam_spatial, resatt, dcn's eager im2col) the times hold that "
          "compute too.\n")
    print(TABLE_FORMAT.format(*TABLE_HEADER))
    for m in measured:
        print(table_line(m))
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for m in measured:
            writer.writerows(csv_rows(m, args.shape, args.dtype, args.layout, run_info))
    print(f"\nwrote {args.csv} ({time.perf_counter() - start:.0f} s)")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
