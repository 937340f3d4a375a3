"""Latency and memory of the attention blocks: timm eager, torch.compile of it, and the fused kernels.

    python -m attn_kernels.bench                  # ResNet-50 stages at batch 32 and 128, bf16 and fp32, both layouts
    python -m attn_kernels.bench --ledger [...]   # the ledger instead (attn_kernels.ledger): bytes,
                                                  # launches, occupancy; the default without a GPU
    python -m attn_kernels.bench --host [...]     # host cost vs eager, kernel bodies skipped, on CPU
                                                  # tensors (attn_kernels.host_cost)
    python -m attn_kernels.bench --quick          # a smoke run: batch 32, two stages
    python -m attn_kernels.bench --impls eager triton --dtypes bf16 --layouts channels_last --plot
    python -m attn_kernels.bench --directions fwd+bwd --compile-workers 12 --time-budget 200   # a lent GPU

Protocol (DESIGN.md, "Benchmark protocol"): triton.testing.do_bench medians and 20th/80th
percentiles with L2 flushed between runs, for forward (x requires grad, as in training), backward
alone and forward+backward; peak memory of one forward+backward; achieved GB/s on the bytes no
implementation can avoid, and that as a fraction of the floor set by the measured copy bandwidth.
A table goes to the screen, a row per measurement to a CSV, and with --plot a PNG beside it.
"""
import argparse
import contextlib
import csv
import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import attn_kernels
from attn_kernels import info

try:
    import timm
except ImportError:
    sys.exit("attn_kernels.bench compares against timm's modules: pip install timm (or attn_kernels[bench])")


# Multiples of |x| every implementation must move: fwd reads x and writes y; bwd reads x and dy, writes dx.
COMPULSORY_PASSES = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}


@dataclass
class Block:
    eager: Callable[[int], nn.Module]  # the timm module for C channels (or the papers' formula): the baseline
    fused: Callable[[int], nn.Module]  # its attn_kernels drop-in, taking the same state_dict
    # Compulsory passes over x per direction, for GB/s and the floor; None where convs or matmuls
    # inside the block (SK's branches, non-local's attention) make bandwidth the wrong yardstick.
    passes: Optional[Dict[str, int]] = None
    # The implementations of the fused module: kernel backends, or 'sdpa' (non-local's attention).
    fused_impls: tuple = ("triton", "cuda")


class EagerSAM(nn.Module):
    """YOLOv4's SAM as darknet computes it, x * sigmoid(conv(x)); residual: Residual Attention's
    (1 + sigmoid(mask)) * trunk with the mask a 1x1 conv of the trunk. FusedSAM's state_dict."""

    def __init__(self, channels: int, spatial: bool = False, residual: bool = False):
        super().__init__()
        k = 7 if spatial else 1
        self.conv = nn.Conv2d(channels, 1 if spatial else channels, k, padding=k // 2)
        self.residual = residual

    def forward(self, x):
        mask = torch.sigmoid(self.conv(x))
        return (1 + mask) * x if self.residual else x * mask


class FusedResidualAttentionBench(EagerSAM):
    """EagerSAM(residual=True) with the fused (1 + M) * T."""

    def forward(self, x):
        return attn_kernels.functional.residual_attention(x, self.conv(x))

    def dispatch(self, x):
        return attn_kernels.functional.sigmoid_gate_dispatch(x, x)  # x stands in for the mask logits


class ATLoss(nn.Module):
    """at_loss(x, teacher) with the teacher x itself, detached (the timing reads it as a second
    activation); fused=False: the paper's formula (attn_kernels.reference)."""

    def __init__(self, fused: bool):
        super().__init__()
        self.loss = attn_kernels.at_loss if fused else attn_kernels.reference.at_loss

    def forward(self, x):
        return self.loss(x, x.detach())

    def dispatch(self, x):
        return attn_kernels.functional.at_map_dispatch(x)


class EagerSCSE(attn_kernels.FusedSCSE):
    """segmentation_models_pytorch's SCSEModule in eager PyTorch, x * cSE(x) + x * sSE(x): FusedSCSE's
    submodules run by its reference_forward, smp's code (smp need not be installed where the
    benchmark runs)."""

    def forward(self, x):
        return self.reference_forward(x)


class EagerDeformConvPack(attn_kernels.FusedModulatedDeformConv2dPack):
    """mmcv's ModulatedDeformConv2dPack (3x3, C -> C) on torchvision's deform_conv2d, which builds
    the im2col columns: the baseline. Its offset conv starts from small random weights, not mmcv's
    zeros, so the samples fall between pixels as in a trained model."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1)
        nn.init.normal_(self.conv_offset.weight, std=0.01)

    def forward(self, x):
        import torchvision

        offset, mask = self._offset_and_mask(x)
        return torchvision.ops.deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding,
                                             self.dilation, mask)


# One entry per block; a new block adds one line here.
BLOCKS: Dict[str, Block] = {
    "se": Block(eager=lambda c: timm.layers.SEModule(c), fused=lambda c: attn_kernels.FusedSE(c)),
    "cbam": Block(eager=lambda c: timm.layers.cbam.CbamModule(c), fused=lambda c: attn_kernels.FusedCBAM(c)),
    "eca": Block(eager=lambda c: timm.layers.EcaModule(c), fused=lambda c: attn_kernels.FusedECA(c)),
    # GlobalContext as timm builds it by default (attention pooling, scale) and as its gcresnet
    # models do ('gca': attention pooling, add).
    "gc": Block(eager=lambda c: timm.layers.GlobalContext(c), fused=lambda c: attn_kernels.FusedGC(c)),
    "gca": Block(eager=lambda c: timm.layers.GlobalContext(c, fuse_add=True, fuse_scale=False),
                 fused=lambda c: attn_kernels.FusedGC(c, fuse_add=True, fuse_scale=False)),
    # The whole SelectiveKernel (its two conv branches included, as a model runs it): stride 1, C -> C.
    "sk": Block(eager=lambda c: timm.layers.SelectiveKernel(c), fused=lambda c: attn_kernels.FusedSelectiveKernel(c),
                passes=None),
    "sam": Block(eager=lambda c: EagerSAM(c), fused=lambda c: attn_kernels.FusedSAM(c), passes=None),
    "sam_spatial": Block(eager=lambda c: EagerSAM(c, spatial=True),
                         fused=lambda c: attn_kernels.FusedSAM(c, spatial=True), passes=None),
    "resatt": Block(eager=lambda c: EagerSAM(c, residual=True), fused=lambda c: FusedResidualAttentionBench(c, residual=True),
                    passes=None),
    "nonlocal": Block(eager=lambda c: timm.layers.NonLocalAttn(c), fused=lambda c: attn_kernels.FusedNonLocalAttn(c),
                      passes=None, fused_impls=("sdpa",)),
    "scse": Block(eager=lambda c: EagerSCSE(c), fused=lambda c: attn_kernels.FusedSCSE(c)),
    # A 3x3 modulated deformable conv, C -> C, its offsets and masks from a 3x3 conv of x (mmcv's DCNv2).
    "dcn": Block(eager=lambda c: EagerDeformConvPack(c), fused=lambda c: attn_kernels.FusedModulatedDeformConv2dPack(
        c, c, 3, padding=1), passes=None, fused_impls=("triton",)),
    # Student and teacher of x's shape: fwd reads both, bwd reads the student and writes its gradient.
    "at": Block(eager=lambda c: ATLoss(fused=False), fused=lambda c: ATLoss(fused=True),
                passes={"fwd": 2, "bwd": 2, "fwd+bwd": 4}),
}
for _name in ("se", "cbam", "eca", "gc", "gca", "scse"):
    BLOCKS[_name].passes = COMPULSORY_PASSES

RESNET50_STAGES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]  # C, H, W of the SE sites
QUICK_STAGES = [RESNET50_STAGES[0], RESNET50_STAGES[2]]
# Baselines first: the speedups are relative to them. 'sdpa' is the non-local drop-ins' attention.
IMPLS = ("eager", "compile", "triton", "cuda", "sdpa")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
CSV_COLUMNS = [
    "block", "impl", "direction", "dtype", "layout", "shape", "median_ms", "p20_ms", "p80_ms", "peak_mb",
    "gbps", "floor_fraction", "speedup_vs_eager", "speedup_vs_compile", "gpu", "torch", "triton", "commit", "date",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m attn_kernels.bench",
        description="Time the attention blocks (forward, backward, forward+backward) and their peak memory: "
        "timm eager vs torch.compile of it vs the fused Triton and CUDA kernels. Needs a CUDA GPU; "
        "without one it says which backends this machine can run, and why not the others.",
    )
    add = parser.add_argument
    add("--blocks", nargs="+", choices=sorted(BLOCKS), default=sorted(BLOCKS), help="blocks to time (default: all)")
    add("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
        help="implementations to time (default: all); eager and compile are the baselines of the speedups")
    add("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"],
        help="dtypes of x (default: bf16 fp32)")
    add("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
        help="memory layouts of x (default: both)")
    add("--batch", nargs="+", type=int, help="batch sizes (default: 32 128; with --quick: 32)")
    add("--quick", action="store_true", help="smoke run: batch 32 and two of the four ResNet-50 stages")
    add("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS),
        help="directions to time (default: all); fwd+bwd is always timed, the speedups and the plot are of it")
    add("--time-budget", type=float, metavar="SECONDS",
        help="start no case after this many seconds; the cases left are listed (default: no limit)")
    add("--compile-workers", type=int, default=0, metavar="K",
        help="first run every case once in K processes, so that the timing process finds torch.compile's "
        "and Triton's on-disk caches warm and compiles little itself (default: 0, compile while timing)")
    add("--csv", metavar="PATH",
        help="CSV to append rows to (default: benchmarks/results/bench-<gpu>-<YYYYMMDD>.csv under the current folder)")
    add("--plot", action="store_true", help="also save a PNG of the fwd+bwd speedups vs eager beside the CSV")
    args = parser.parse_args(argv)
    args.impls = [impl for impl in IMPLS if impl in args.impls]  # baselines first, whatever the order given
    if args.batch is None:
        args.batch = [32] if args.quick else [32, 128]
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch sizes must be positive, got {args.batch}")
    if args.compile_workers < 0:
        parser.error(f"--compile-workers must be 0 or more, got {args.compile_workers}")
    args.directions = [d for d in DIRECTIONS if d in args.directions or d == "fwd+bwd"]
    return args


def gpu_slug() -> str:
    """The GPU's name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    """The commit of the checkout this package lives in, so a CSV row says what code it measured;
    $ATTN_KERNELS_COMMIT where the code travelled without its git history (a lent GPU's copy)."""
    if os.environ.get("ATTN_KERNELS_COMMIT"):
        return os.environ["ATTN_KERNELS_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True, text=True, check=True,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report_no_gpu() -> None:
    print("No CUDA GPU is present (torch.cuda.is_available() is False), so nothing is timed. What this "
          "machine can measure, the ledger (python -m attn_kernels.ledger), follows: bytes and launches "
          "of every block, fused and eager, and the occupancy of every launch.\n")
    print(info.report())
    print("\nOn a GPU machine, benchmarks/gpu_check.sh builds the extension, runs the tests and this benchmark.\n",
          flush=True)


def copy_bandwidth_gbps(do_bench) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): what a memory-bound op can reach."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def configure_compile() -> None:
    """torch.compile settings of the timing process, and of the --compile-workers processes, whose
    on-disk cache entries it can only reuse if the settings (part of the cache key) match."""
    # Compiled backwards with donated buffers (reusing saved intermediates' memory for their results)
    # refuse the retain_graph=True that timing backward alone needs. Turning them off leaves the times
    # as they are and may raise compile's peak memory by its saved intermediates: (N, C) ones for SE.
    torch._functorch.config.donated_buffer = False


def compiled_or_none(eager: nn.Module, x: torch.Tensor, dy: torch.Tensor, label: str, say=print) -> Optional[nn.Module]:
    """torch.compile of the eager module, warmed up; None (after one line saying why) if it fails."""
    # A fresh cache per module: otherwise dynamo marks shapes dynamic after the first recompile
    # and falls back to eager past its recompile limit, and we would time neither fairly.
    torch._dynamo.reset()
    compiled = torch.compile(eager, dynamic=False)
    try:
        for _ in range(2):  # the first call compiles forward and backward; the second runs as timed
            compiled(x).backward(dy)
    except Exception as e:  # noqa: BLE001 (any failure of the compiler skips this impl, the run goes on)
        message = (str(e).strip().splitlines() or [""])[0]
        say(f"  compile failed for {label}, skipping it: {type(e).__name__}: {message}")
        return None
    return compiled


def clear_grads(leaves: List[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def time_directions(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, leaves, do_bench,
                    directions=DIRECTIONS) -> Dict[str, tuple]:
    """(median, p20, p80) ms per direction. Grads are reset before each run so none accumulates."""
    y = model(x) if "bwd" in directions else None  # the graph the backward-alone timing walks again and again
    runs = {
        "fwd": lambda: model(x),
        "bwd": lambda: y.backward(dy, retain_graph=True),
        "fwd+bwd": lambda: model(x).backward(dy),
    }
    times = {d: tuple(do_bench(runs[d], quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves)) for d in directions}
    clear_grads(leaves)
    return times


def peak_memory_mb(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, leaves) -> float:
    """Memory one forward+backward allocates beyond what was already held (inputs, weights)."""
    clear_grads(leaves)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(x).backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    clear_grads(leaves)
    return peak / 1e6


@dataclass
class Case:
    """One input the blocks are timed on."""

    block: str
    shape: tuple  # N, C, H, W
    dtype: str
    layout: str

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))

    def __str__(self):
        return f"{self.block} {self.shape_text} {self.dtype} {self.layout}"


def cases(args: argparse.Namespace) -> List[Case]:
    """Every block at one input before the next input: a run cut short by --time-budget has
    compared all blocks at the inputs it reached."""
    stages = QUICK_STAGES if args.quick else RESNET50_STAGES
    return [Case(block, (batch, c, h, w), dtype, layout) for batch, (c, h, w), dtype, layout, block
            in itertools.product(args.batch, stages, args.dtypes, args.layouts, args.blocks)]


def prepared_models(case: Case, impls, say=print):
    """Yields (impl, model, backend context, x, dy) for each impl that can run the case; `say`
    is given the reason each impl that cannot is skipped."""
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.shape, device="cuda", dtype=dtype).contiguous(memory_format=LAYOUTS[case.layout])
    x.requires_grad_()
    channels = case.shape[1]
    block = BLOCKS[case.block]
    eager = block.eager(channels).to(device="cuda", dtype=dtype)
    fused = block.fused(channels).to(device="cuda", dtype=dtype)
    fused.load_state_dict(eager.state_dict(), strict=True)  # both compute the same function
    with torch.no_grad():
        dy = torch.randn_like(fused(x))  # in the output's shape and layout, as the gradient of y would be
    for impl in impls:
        context = contextlib.nullcontext()
        if impl == "eager":
            model = eager
        elif impl == "compile":
            model = compiled_or_none(eager, x, dy, str(case), say)
            if model is None:
                continue
        elif impl not in block.fused_impls:
            continue
        elif impl == "sdpa":
            model = fused
        else:
            with attn_kernels.use_backend(impl):
                choice = fused.dispatch(x)  # the backend this module would really run on x
            why = choice.passed_over.get(impl) if choice.backend != impl else None
            if why is not None:
                say(f"  skipping {impl}: {why}")
                continue
            model, context = fused, attn_kernels.use_backend(impl)
        yield impl, model, context, x, dy


def measure_case(case: Case, impls, directions, do_bench, say):
    """Yields (impl, {direction: (median, p20, p80) ms}, peak MB) for each impl that can run the case."""
    for impl, model, context, x, dy in prepared_models(case, impls, say):
        leaves = [x, *model.parameters()]
        with context:  # the backend is picked at forward time and kept for backward
            times = time_directions(model, x, dy, leaves, do_bench, directions)
            peak_mb = peak_memory_mb(model, x, dy, leaves)
        yield impl, times, peak_mb


def warm_caches(case_list: List[Case], impls) -> None:
    """In a --compile-workers process: one forward+backward of each impl of each case, which fills
    the on-disk caches of torch.compile (FX graphs, AOT autograd) and of Triton's JIT."""
    configure_compile()
    for case in case_list:
        for _, model, context, x, dy in prepared_models(case, impls, say=lambda message: None):
            with context:
                model(x).backward(dy)


def warm_caches_in_workers(case_list: List[Case], impls, workers: int) -> None:
    """Runs warm_caches over case_list in `workers` processes (spawned: CUDA does not survive fork)."""
    import multiprocessing

    start = time.monotonic()
    # Each worker compiles one module at a time: inductor's own pool of compile processes per worker
    # would put workers x cores processes on the cores. The variable is read when a process imports
    # torch, so setting it here reaches the workers and leaves this process as it is.
    previous = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    try:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(warm_caches, [(case_list[i::workers], impls) for i in range(workers)])
    finally:
        if previous is None:
            del os.environ["TORCHINDUCTOR_COMPILE_THREADS"]
        else:
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = previous
    print(f"Compiled every case in {workers} processes in {time.monotonic() - start:.0f} s.\n", flush=True)


TABLE_FORMAT = "{:<11} {:<16} {:<5} {:<13} {:<8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9} {:>7} {:>6}"
TABLE_HEADER = ("block", "shape", "dtype", "layout", "impl", "fwd ms", "bwd ms", "f+b ms",
                "xeager", "xcompile", "peak MB", "GB/s", "floor")


class Report:
    """Turns measurements into CSV rows (one per direction), a table row and the plot's bars."""

    def __init__(self, csv_file, environment: dict, copy_gbps: float):
        self.writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
        if csv_file.tell() == 0:  # a new file; rows of later runs the same day append below one header
            self.writer.writeheader()
        self.csv_file = csv_file
        self.environment = environment
        self.copy_gbps = copy_gbps
        self.case, self.medians = None, {}  # impl -> direction -> median ms of self.case, for the speedups
        self.speedups_to_plot = []  # (case label, impl, fwd+bwd speedup vs eager)

    def speedup(self, baseline_impl: str, direction: str, ms: float) -> Optional[float]:
        baseline = self.medians.get(baseline_impl, {}).get(direction)
        return baseline / ms if baseline is not None else None

    def throughput(self, case: Case, direction: str, ms: float):
        """Achieved GB/s on the compulsory bytes, and its fraction of the floor (copy bandwidth);
        (None, None) for a block without a bandwidth floor."""
        passes = BLOCKS[case.block].passes
        if passes is None:
            return None, None
        compulsory_bytes = passes[direction] * torch.Size(case.shape).numel() * DTYPES[case.dtype].itemsize
        gbps = compulsory_bytes / (ms * 1e-3) / 1e9
        return gbps, gbps / self.copy_gbps

    def add(self, case: Case, impl: str, times: dict, peak_mb: float):
        if case is not self.case:
            self.case, self.medians = case, {}
        self.medians[impl] = {direction: t[0] for direction, t in times.items()}
        for direction, (median, p20, p80) in times.items():
            gbps, floor_fraction = self.throughput(case, direction, median)
            vs_eager, vs_compile = (self.speedup(baseline, direction, median) for baseline in ("eager", "compile"))
            self.writer.writerow({
                "block": case.block, "impl": impl, "direction": direction, "dtype": case.dtype,
                "layout": case.layout, "shape": case.shape_text,
                "median_ms": f"{median:.5f}", "p20_ms": f"{p20:.5f}", "p80_ms": f"{p80:.5f}",
                "peak_mb": f"{peak_mb:.2f}", "gbps": "" if gbps is None else f"{gbps:.1f}",
                "floor_fraction": "" if floor_fraction is None else f"{floor_fraction:.3f}",
                "speedup_vs_eager": "" if vs_eager is None else f"{vs_eager:.3f}",
                "speedup_vs_compile": "" if vs_compile is None else f"{vs_compile:.3f}",
                **self.environment,
            })
        self.csv_file.flush()  # an interrupted run keeps what it measured
        both = times["fwd+bwd"][0]
        gbps, floor_fraction = self.throughput(case, "fwd+bwd", both)
        vs_eager, vs_compile = (self.speedup(baseline, "fwd+bwd", both) for baseline in ("eager", "compile"))
        print(TABLE_FORMAT.format(
            case.block, case.shape_text, case.dtype, case.layout, impl,
            *(f"{times[d][0]:.3f}" if d in times else "-" for d in DIRECTIONS),
            speedup_text(vs_eager), speedup_text(vs_compile),
            f"{peak_mb:.1f}", "-" if gbps is None else f"{gbps:.0f}",
            "-" if floor_fraction is None else f"{floor_fraction:.0%}"), flush=True)
        if impl != "eager" and vs_eager is not None:
            self.speedups_to_plot.append((str(case), impl, vs_eager))


def speedup_text(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.2f}x"


def run(args: argparse.Namespace) -> None:
    import triton  # only here: the no-GPU report must not need triton
    from triton.testing import do_bench

    csv_path = args.csv or os.path.join(
        "benchmarks", "results", f"bench-{gpu_slug()}-{datetime.now(timezone.utc):%Y%m%d}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    pyplot = None
    if args.plot:  # checked before the run, not after it, so a missing matplotlib is news early
        try:
            import matplotlib

            matplotlib.use("Agg")  # write a file; never open a window
            from matplotlib import pyplot
        except ImportError:
            print("--plot: matplotlib is not installed (pip install matplotlib), so no PNG will be written.")

    environment = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    copy_gbps = copy_bandwidth_gbps(do_bench)
    print(f"{environment['gpu']}: torch {environment['torch']}, triton {environment['triton']}, "
          f"commit {environment['commit']}; copy bandwidth {copy_gbps:.0f} GB/s")
    print(f"Rows appended to {csv_path}. Speedups, GB/s and floor are of fwd+bwd; "
          "floor = (compulsory bytes / copy bandwidth) / time.\n")

    start = time.monotonic()
    configure_compile()
    case_list = cases(args)
    if args.compile_workers:
        warm_caches_in_workers(case_list, args.impls, args.compile_workers)
    print(TABLE_FORMAT.format(*TABLE_HEADER), flush=True)
    reasons_given = set()

    def say_once(message: str) -> None:
        if message not in reasons_given:
            reasons_given.add(message)
            print(message, flush=True)

    with open(csv_path, "a", newline="") as csv_file:
        report = Report(csv_file, environment, copy_gbps)
        for i, case in enumerate(case_list):
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                left = case_list[i:]
                print(f"Time budget of {args.time_budget:g} s spent: {len(left)} of {len(case_list)} cases not run: "
                      + "; ".join(map(str, left)), flush=True)
                break
            for impl, times, peak_mb in measure_case(case, args.impls, args.directions, do_bench, say_once):
                report.add(case, impl, times, peak_mb)
    if pyplot is not None and report.speedups_to_plot:
        print(f"Plot written to {plot_speedups(pyplot, report.speedups_to_plot, csv_path)}")


def plot_speedups(pyplot, speedups, csv_path: str) -> str:
    """Grouped bars: per case, one bar per implementation, fwd+bwd speedup over timm eager."""
    labels = list(dict.fromkeys(label for label, _, _ in speedups))
    impls = list(dict.fromkeys(impl for _, impl, _ in speedups))
    width = 0.8 / len(impls)
    figure, axes = pyplot.subplots(figsize=(max(8, 0.9 * len(labels) + 2), 5))
    for i, impl in enumerate(impls):
        values = {label: s for label, name, s in speedups if name == impl}
        positions = [c + i * width for c, label in enumerate(labels) if label in values]
        axes.bar(positions, [values[label] for label in labels if label in values], width, label=impl)
    axes.axhline(1.0, color="black", linewidth=0.8)  # parity with eager
    axes.set_xticks([c + width * (len(impls) - 1) / 2 for c in range(len(labels))])
    axes.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("fwd+bwd speedup vs timm eager")
    axes.set_title(f"attn_kernels on {torch.cuda.get_device_name()}")
    axes.legend()
    figure.tight_layout()
    png_path = os.path.splitext(csv_path)[0] + ".png"
    figure.savefig(png_path, dpi=120)
    pyplot.close(figure)
    return png_path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--host" in argv:
        from attn_kernels import host_cost

        return host_cost.main([a for a in argv if a != "--host"])
    if "--ledger" in argv or not torch.cuda.is_available():
        from attn_kernels import ledger

        if not torch.cuda.is_available():
            report_no_gpu()
        return ledger.main([a for a in argv if a != "--ledger"])
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
