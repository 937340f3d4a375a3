"""Train a timm model on synthetic images, with its attention modules fused by attn_kernels or not.

    python examples/train.py --model seresnet50 --patch --amp bf16 --channels-last
    python examples/train.py --model resnet50 --block-attn cbam --patch --optimizer adam --steps 50
    python examples/train.py --model efficientnet_b0 --patch --compile
    torchrun --nproc_per_node=8 examples/train.py --model resnet50 --block-attn cbam --patch --sync-bn
    torchrun --nproc_per_node=8 examples/train.py --model seresnet50 --patch --fsdp
    torchrun --nproc_per_node=2 examples/train.py --model resnet18 --block-attn se --patch --device cpu --amp none

The images are made here, no download: each class is a random low-resolution colour pattern,
upsampled, plus noise, so the loss falls within a few hundred steps. At the end it prints images/s
(after the warm-up steps) and the peak GPU memory. Run it twice, with and without --patch, to see
what the fused kernels change.

Under torchrun each process trains on its own stream of images (its seed plus its rank) with
DistributedDataParallel (NCCL on GPUs, gloo on the CPU), or with FSDP2 (--fsdp: every block of the
model's stages, then the model, sharded with fully_shard); rank 0 prints the progress and the
summary, images/s of all processes together and the largest peak memory of any.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import attn_kernels

try:
    import timm
except ImportError:
    sys.exit("examples/train.py trains timm models: pip install timm")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="seresnet50", help="a timm model name (default: seresnet50)")
    add("--block-attn", metavar="NAME", help="ResNet only: the attention layer of every block (e.g. cbam, eca, se)")
    add("--patch", action="store_true", help="fuse the attention modules with attn_kernels.patch")
    add("--backend", choices=attn_kernels.BACKENDS, default="auto", help="attn_kernels backend (default: auto)")
    add("--optimizer", choices=["sgd", "adam"], default="sgd",
        help="sgd: momentum 0.9, Nesterov, weight decay 5e-4 (default); adam: weight decay 5e-4")
    add("--lr", type=float, help="learning rate (default: 0.1 for SGD, 1e-3 for Adam)")
    add("--amp", choices=["none", "bf16", "fp16"], default="bf16", help="autocast dtype (default: bf16)")
    add("--channels-last", action="store_true", help="model and images in channels_last")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--sync-bn", action="store_true",
        help="under torchrun, on GPUs: every BatchNorm an nn.SyncBatchNorm (those inside fused blocks are "
        "synchronized by attn_kernels)")
    add("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 (fully_shard) instead of DDP")
    add("--batch-size", type=int, default=64)
    add("--image-size", type=int, default=224)
    add("--classes", type=int, default=10, help="synthetic classes (default: 10)")
    add("--steps", type=int, default=100, help="training steps (default: 100)")
    add("--warmup", type=int, default=10, help="steps left out of images/s (default: 10)")
    add("--seed", type=int, default=0)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for name in ("batch_size", "image_size", "classes", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.amp == "fp16" and args.device == "cpu":
        parser.error("--amp fp16 needs a GPU; use bf16 or none on the CPU")
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if args.world_size == 1 and (args.sync_bn or args.fsdp):
        parser.error("--sync-bn and --fsdp are for several processes: run under torchrun --nproc_per_node=K")
    if args.sync_bn and args.device == "cpu":
        parser.error("--sync-bn needs GPUs: PyTorch's nn.SyncBatchNorm, which the BatchNorms outside the fused blocks "
                     "become, runs on CUDA tensors only, and DistributedDataParallel refuses it in CPU modules")
    return args


class SyntheticImages:
    """Batches of labelled images made on the device: a class's image is its 3 x 8 x 8 pattern,
    bilinearly upsampled, plus Gaussian noise."""

    def __init__(self, classes, size, batch_size, device, memory_format, seed):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.patterns = torch.randn(classes, 3, 8, 8, device=device, generator=self.generator)
        self.size, self.batch_size, self.memory_format = size, batch_size, memory_format

    def batch(self):
        labels = torch.randint(len(self.patterns), (self.batch_size,), device=self.patterns.device,
                               generator=self.generator)
        images = F.interpolate(self.patterns[labels], size=self.size, mode="bilinear", align_corners=False)
        images = images + 0.5 * torch.randn(images.shape, device=images.device, generator=self.generator)
        return images.contiguous(memory_format=self.memory_format), labels


def progress(step, total, loss, images_per_s, width=30):
    done = int(width * step / total)
    rate = f"{images_per_s:8.1f} img/s" if images_per_s else " " * 14
    print(f"\r[{'#' * done}{'.' * (width - done)}] {step:>5}/{total}  loss {loss:7.4f}  {rate}", end="", flush=True)


def shard(model):
    """FSDP2: every block of the model's top-level stages (children of its nn.Sequential
    children), then the model."""
    from torch.distributed.fsdp import fully_shard

    for stage in model.children():
        if isinstance(stage, nn.Sequential):
            for block in stage:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    return fully_shard(model)


def main():
    args = parse_args()
    if args.world_size == 1:
        train(args, rank=0)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        # The model, its DDP wrapper included, is freed when train returns: freed after the
        # process group is destroyed, DDP's destructor can wait forever (seen with gloo).
        train(args, rank)
    finally:
        dist.destroy_process_group()


def train(args, rank: int):
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    device = torch.device(args.device)
    kwargs = {"block_args": {"attn_layer": args.block_attn}} if args.block_attn else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes, **kwargs).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    if args.patch:
        attn_kernels.patch(model)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.patch:
        say(attn_kernels.patch_report(model))
    attn_kernels.set_backend(args.backend)
    if args.fsdp:
        model = shard(model)
    if args.compile:
        model = torch.compile(model)
    if args.world_size > 1 and not args.fsdp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    decay = 5e-4
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr or 0.1, momentum=0.9, nesterov=True, weight_decay=decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr or 1e-3, weight_decay=decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    data = SyntheticImages(args.classes, args.image_size, args.batch_size, device, memory_format, args.seed + rank)

    parallel = f", {args.world_size} processes ({'FSDP2' if args.fsdp else 'DDP'})" if args.world_size > 1 else ""
    say(f"{args.model}{' +' + args.block_attn if args.block_attn else ''}: "
          f"{'patched' if args.patch else 'not patched'}, backend {args.backend}, {args.optimizer}, amp {args.amp}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}{', compiled' if args.compile else ''}, "
          f"batch {args.batch_size} x {args.image_size}^2 per process, on {device.type}{parallel}"
          f"{', SyncBatchNorm' if args.sync_bn else ''}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter() if args.warmup == 0 else None
    for step in range(1, args.steps + 1):
        images, labels = data.batch()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        if step % 10 == 0 or step == args.steps:
            # .item() waits for the GPU: only every few steps, so the timing is not serialized.
            elapsed = time.perf_counter() - start if start is not None and step > args.warmup else None
            rate = (step - args.warmup) * args.batch_size / elapsed if elapsed else None
            if rank == 0:
                progress(step, args.steps, loss.item(), rate and rate * args.world_size)
    synchronize()
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    timed_steps = args.steps - args.warmup
    # All processes together: the images of every process over the slowest one's time; the
    # largest peak memory of any.
    summary = torch.tensor([elapsed, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0.0],
                           dtype=torch.float64, device=device)
    if args.world_size > 1:
        dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    elapsed, peak = summary.tolist()
    say(f"\n{timed_steps * args.batch_size * args.world_size / elapsed:.1f} images/s over the last {timed_steps} steps "
        f"({1e3 * elapsed / timed_steps:.1f} ms a step{f', {args.world_size} processes' if args.world_size > 1 else ''})")
    if device.type == "cuda":
        say(f"peak GPU memory: {peak / 2**20:.0f} MiB{' (the largest of any process)' if args.world_size > 1 else ''}")


if __name__ == "__main__":
    main()
