"""Training-step time of whole timm models: eager, patched, torch.compile, and compile + patched.

    python -m attn_kernels.bench_train                      # every model, bf16 autocast, channels_last, batch 128
    python -m attn_kernels.bench_train --models seresnet50 resnet50 --impls eager patched --plot
    python -m attn_kernels.bench_train --quick              # a smoke run: seresnet50 and resnet50, eager and patched

A step is forward, cross-entropy loss, backward and an SGD step (momentum 0.9, Nesterov, weight
decay 5e-4). Each (model, implementation) is warmed up, then timed over --steps steps with CUDA
events; the CSV gets the median step time, its 20th and 80th percentiles, images/s, the peak memory
of a step, and the attention overhead: the step time over that of the same model with its
attention modules replaced by nn.Identity (same implementation), minus one. Plain resnet50 is the
no-attention baseline of the ResNet-50 family. Rows go to benchmarks/results/train-step-<gpu>-<date>.csv,
and with --plot a PNG of the step times beside it.
"""
import argparse
import copy
import csv
import os
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import attn_kernels
from .bench import git_commit, gpu_slug, report_no_gpu

try:
    import timm
except ImportError:
    raise SystemExit("attn_kernels.bench_train times timm models: pip install timm (or attn_kernels[bench])")

# name -> timm.create_model keyword arguments
MODELS: Dict[str, dict] = {
    "resnet50": {},
    "seresnet50": {},
    "seresnext50_32x4d": {},
    "ecaresnet50d": {},
    "gcresnet50t": {},
    "resnet50_cbam": {"model_name": "resnet50", "block_args": {"attn_layer": "cbam"}},
    "efficientnet_b0": {},
    "mobilenetv3_large_100": {},
    "regnety_016": {},
}
IMPLS = ("eager", "patched", "compile", "compile+patched")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CSV_COLUMNS = [
    "model", "impl", "dtype", "layout", "batch", "image_size", "step_ms", "p20_ms", "p80_ms", "images_per_s",
    "peak_mb", "no_attn_step_ms", "attention_overhead", "speedup_vs_eager", "gpu", "torch", "triton", "commit", "date",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m attn_kernels.bench_train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models (default: all)")
    add("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations (default: all)")
    add("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype; fp32 turns autocast off (default: bf16)")
    add("--nchw", action="store_true", help="NCHW instead of channels_last")
    add("--batch", type=int, default=128)
    add("--image-size", type=int, default=224)
    add("--steps", type=int, default=20, help="timed steps (default: 20)")
    add("--warmup", type=int, default=5, help="untimed steps first (default: 5; compiling happens here)")
    add("--csv", metavar="PATH", help="CSV to append to (default: benchmarks/results/train-step-<gpu>-<YYYYMMDD>.csv)")
    add("--plot", action="store_true", help="also save a PNG of the step times beside the CSV")
    add("--quick", action="store_true", help="smoke run: seresnet50 and resnet50, eager and patched, 10 steps")
    add("--time-budget", type=float, metavar="SECONDS",
        help="start no model after this many seconds; the models left are listed (default: no limit)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.impls, args.steps = ["resnet50", "seresnet50"], ["eager", "patched"], 10
    args.impls = [impl for impl in IMPLS if impl in args.impls]
    for name in ("batch", "image_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def create_model(name: str) -> nn.Module:
    kwargs = dict(MODELS[name])
    return timm.create_model(kwargs.pop("model_name", name), pretrained=False, **kwargs)


def without_attention(model: nn.Module) -> nn.Module:
    """A copy of model whose attention modules (those attn_kernels.patch would fuse) are nn.Identity."""
    model = copy.deepcopy(model)
    for entry in attn_kernels.patch_report(model).with_status("patchable"):
        parent_name, _, child = entry.name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
    return model


def time_steps(model: nn.Module, impl: str, args, images, labels) -> Optional[dict]:
    """Step times (ms) and peak memory (MB) of a training step of a copy of model, or None when
    it fails (said in one line)."""
    model = copy.deepcopy(model)
    if "patched" in impl:
        attn_kernels.patch(model)
    torch._dynamo.reset()  # a fresh compile per model: no recompile limits, no stale guards
    run = torch.compile(model) if impl.startswith("compile") else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dtype = DTYPES[args.dtype]

    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(run(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        for _ in range(args.warmup):
            step()
    except Exception as e:  # a failed compile of one configuration should not end the whole run
        print(f"  {impl}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    t = torch.tensor(times)
    return {"median": t.median().item(), "p20": t.quantile(0.2).item(), "p80": t.quantile(0.8).item(),
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def plot(pyplot, rows: List[dict], png_path: str) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    figure, axes = pyplot.subplots(figsize=(max(8, 1.2 * len(models) + 2), 5))
    for i, impl in enumerate(impls):
        values = {r["model"]: float(r["step_ms"]) for r in rows if r["impl"] == impl}
        axes.bar([c + i * width for c, m in enumerate(models) if m in values],
                 [values[m] for m in models if m in values], width, label=impl)
    axes.set_xticks([c + width * (len(impls) - 1) / 2 for c in range(len(models))])
    axes.set_xticklabels(models, rotation=30, ha="right")
    first = rows[0]
    axes.set_ylabel("training step (ms)")
    axes.set_title(f"{first['dtype']} {first['layout']}, batch {first['batch']} x {first['image_size']}^2 "
                   f"on {first['gpu']}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    pyplot.close(figure)
    return png_path


def run(args) -> None:
    import triton

    csv_path = args.csv or os.path.join(
        "benchmarks", "results", f"train-step-{gpu_slug()}-{datetime.now(timezone.utc):%Y%m%d}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    pyplot = None
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib import pyplot
        except ImportError:
            print("--plot: matplotlib is not installed (pip install matplotlib), so no PNG will be written.")
    environment = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    layout = "nchw" if args.nchw else "channels_last"
    memory_format = torch.contiguous_format if args.nchw else torch.channels_last
    print(f"{environment['gpu']}: torch {environment['torch']}, triton {environment['triton']}, commit "
          f"{environment['commit']}; {args.dtype}, {layout}, batch {args.batch} x {args.image_size}^2; rows -> {csv_path}")
    print(f"{'model':<22} {'impl':<16} {'step ms':>8} {'img/s':>8} {'peak MB':>8} {'no-attn ms':>10} "
          f"{'overhead':>8} {'x eager':>7}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device="cuda", generator=g)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(1000, (args.batch,), device="cuda", generator=g)
    rows = []
    with open(csv_path, "a", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS)
        if csv_file.tell() == 0:
            writer.writeheader()
        start = time.monotonic()
        for i, name in enumerate(args.models):
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                print(f"Time budget of {args.time_budget:g} s spent: not run: {', '.join(args.models[i:])}")
                break
            torch.manual_seed(0)
            model = create_model(name).cuda().to(memory_format=memory_format).train()
            has_attention = bool(attn_kernels.patch_report(model).with_status("patchable"))
            bare = without_attention(model) if has_attention else None
            bare_times = {}  # 'eager' or 'compile' -> the attention-free model's step times
            eager_ms = None
            for impl in args.impls:
                if "patched" in impl and not has_attention:
                    continue  # nothing to patch: the same model as the unpatched row
                measured = time_steps(model, impl, args, images, labels)
                if measured is None:
                    continue
                base = "compile" if impl.startswith("compile") else "eager"
                if bare is not None and base not in bare_times:
                    bare_times[base] = time_steps(bare, base, args, images, labels)
                no_attn = bare_times.get(base)
                ms = measured["median"]
                eager_ms = ms if impl == "eager" else eager_ms
                row = {
                    "model": name, "impl": impl, "dtype": args.dtype, "layout": layout, "batch": args.batch,
                    "image_size": args.image_size, "step_ms": f"{ms:.3f}", "p20_ms": f"{measured['p20']:.3f}",
                    "p80_ms": f"{measured['p80']:.3f}", "images_per_s": f"{args.batch / ms * 1e3:.1f}",
                    "peak_mb": f"{measured['peak_mb']:.0f}",
                    "no_attn_step_ms": f"{no_attn['median']:.3f}" if no_attn else "",
                    "attention_overhead": f"{ms / no_attn['median'] - 1:.4f}" if no_attn else "",
                    "speedup_vs_eager": f"{eager_ms / ms:.3f}" if eager_ms else "",
                    **environment,
                }
                writer.writerow(row)
                csv_file.flush()
                rows.append(row)
                overhead = f"{ms / no_attn['median'] - 1:.1%}" if no_attn else "-"
                speedup = f"{eager_ms / ms:.2f}x" if eager_ms else "-"
                print(f"{name:<22} {impl:<16} {ms:8.2f} {row['images_per_s']:>8} {row['peak_mb']:>8} "
                      f"{row['no_attn_step_ms'] or '-':>10} {overhead:>8} {speedup:>7}", flush=True)
    if pyplot is not None and rows:
        print(f"Plot written to {plot(pyplot, rows, os.path.splitext(csv_path)[0] + '.png')}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        report_no_gpu()
        return
    run(args)


if __name__ == "__main__":
    main()
