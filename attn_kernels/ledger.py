"""The ledger: the DRAM bytes and the launches of each attention block, fused and eager, counted on
any machine (no GPU needed), and the occupancy of every fused launch at the real shapes.

    python -m attn_kernels.bench                  # without a GPU: this ledger (with one: --ledger)
    python -m attn_kernels.ledger --blocks se cbam --stages 2048x7x7 --batch 32

What is counted, and how:
- Fused kernels: every load and store of every launch, instrumented where the kernels run on a
  CPU: the CUDA kernels of csrc/ under the CUDA emulation (its launch log counts the bytes each
  thread moves through the kernel's pointer parameters), the Triton kernels in Triton's
  interpreter (its masked loads and stores; masked-off lanes excluded). A launch's bytes are its
  unique bytes, each byte of a tensor once per launch, reads and writes apart: what DRAM moves when
  the caches keep what one launch reuses. The CSV also has the requested bytes (every access).
- Torch ops: every aten op a block runs (eager: all of them; fused: the small ones around the
  kernels), seen by a TorchDispatchMode. An op reads its input tensors and writes its outputs
  (views and allocations move nothing), and is one launch.
- Saved for backward: the storages autograd keeps from forward to backward, parameters excluded
  (saved_tensors_hooks).

Batch size: eager runs on the meta device at the real N (no data; exact). The fused kernels must
run to be counted, so they run at two small consecutive batches, N = 1 and 2 (SK in eval mode, where
its BatchNorm takes N = 1), or the smallest pair that launches the kernels launched at N where a
launcher chooses its kernels from N (a Triton launcher's split: at N = 1 and 2 with its grids sized
for one SM where that launches them), and each launch's bytes at N are extrapolated as
b(n1) + (b(n1 + 1) - b(n1)) (N - n1). Where a kernel loads and stores depends on shapes, not
values, so the torch ops around the kernels run on fake tensors there (nothing computed). The
extrapolation is exact when a launch's work per sample does not depend on N. The ledger checks it against the launches made at the real N with no block
run (a dry run, whose torch ops run on fake twins of their inputs): the same kernels and block
sizes, and grids that are affine in N too. A row where the check fails says 'approximate'; the
dry run's torch ops are exact.

Estimates, labelled as such wherever they appear: the time of a row on an H100 and an H200 is its
bytes over the copy bandwidth (3.0 and 4.3 TB/s, bytes read plus written) plus its launches times
LAUNCH_US; the floor time is the compulsory bytes of DESIGN.md (fwd: read x, write y; bwd: read x
and dy, write dx) over the same bandwidth. Occupancy is for an H100 (132 SMs), with each kernel's
registers and shared memory from its compile for sm_90a (nvcc -Xptxas -v; Triton's ptxas).
"""
import argparse
import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from attn_kernels import backends
from attn_kernels.bench import BLOCKS, DTYPES, LAYOUTS, RESNET50_STAGES as STAGES, git_commit

# Copy bandwidth, bytes read + written per second (DESIGN.md), and the cost of one launch: eager
# PyTorch's dispatch plus a kernel's start and drain back to back on the stream, about 3 us.
BANDWIDTH_TBPS = {"H100": 3.0, "H200": 4.3}
LAUNCH_US = 3.0
# An H100 SXM: SMs, and per SM: threads, blocks, registers, shared memory (and per block reserved).
SMS, THREADS_PER_SM, BLOCKS_PER_SM, REGISTERS_PER_SM = 132, 2048, 32, 65536
SHARED_PER_SM, SHARED_RESERVED_PER_BLOCK = 228 * 1024, 1024
# An activation-sized pass keeps ~2 MB in flight (3 TB/s x ~0.7 us): about 8 warps per SM, each with
# several 16-byte loads outstanding. A launch with fewer warps in flight leaves the GPU idle.
WARPS_IN_FLIGHT_WANTED = SMS * 8
# A launch moving at least this fraction of |x| is an activation-sized pass, held to that rule.
ACTIVATION_PASS_FRACTION = 0.25

DIRECTIONS = ("fwd", "bwd")
# The kernel backends of each block's fused path, the one 'auto' takes on a GPU first.
KERNEL_BACKENDS = {
    "se": ("cuda", "triton"), "eca": ("cuda", "triton"), "cbam": ("cuda", "triton"), "gc": ("cuda", "triton"),
    "gca": ("cuda", "triton"), "sam_spatial": ("cuda", "triton"), "sam": ("triton",), "resatt": ("triton",),
    "at": ("triton",), "sk": ("triton",), "scse": ("cuda", "triton"),
}
# The benchmark's other blocks, and why the ledger does not count them.
NOT_COUNTED = {
    "nonlocal": "its attention is torch's scaled_dot_product_attention, whose kernels the ledger cannot see into",
    "dcn": ("torchvision's op, its eager baseline, is one aten op to the counter, which cannot see the im2col "
            "columns it builds inside; the README gives the deformable convolution's traffic as estimates"),
}
# Blocks whose kernels are counted in eval mode: SK's BatchNorm over the pooled (N, C) needs N >= 2
# in training; its kernels are the same in eval (the dry run at N, in training, checks their names).
COUNTED_IN_EVAL = {"sk"}


@dataclass
class Launch:
    """One kernel launch or torch op, with the bytes it moves."""
    name: str       # 'aten.mean.dim', 'reduce_nchw_kernel<...>' (CUDA), 'channel_gate:_reduce_kernel' (Triton)
    kind: str       # 'torch', 'cuda' or 'triton'
    read: int = 0   # unique bytes
    written: int = 0
    requested_read: int = 0  # every access
    requested_written: int = 0
    grid: Tuple[int, int, int] = (1, 1, 1)
    threads: int = 0     # per block
    shared: int = 0      # bytes per block: CUDA's dynamic + static, Triton's from its compile
    spec: Optional[dict] = None  # Triton: the specialization the compiled launcher would build


class LedgerError(RuntimeError):
    pass


# ---- counting: the Triton interpreter, the CUDA emulation, torch ops -----------------------------

_recorder = None  # the Recorder counting now, if any


class _Skipped(Exception):
    """Raised at a dry run's first program: the launch is logged, not run."""


class Recorder:
    """The launches of the code run under `with recorder:`, in order. fake_ops: torch ops run on
    fake twins of their inputs (outputs: uninitialized tensors; nothing computed). dry_run: that,
    and kernels are logged, not run."""

    def __init__(self, dry_run: bool = False, fake_ops: bool = False, sms: int = SMS):
        self.dry_run = dry_run
        self.sms = sms  # the SMs Triton's launchers size their grids for
        self.fake_ops = fake_ops or dry_run
        self.launches: List[Launch] = []
        self.saved: Dict[int, int] = {}  # storage -> bytes, of what autograd saved for backward
        self.parameters: set = set()     # storages of parameters: not counted as saved
        self.in_kernel = False           # inside a Triton launch: the interpreter's own torch ops
        self._accesses = None            # the running Triton launch's (read?, addresses, element size)
        self._grid = None
        self._stack = None

    def __enter__(self):
        global _recorder
        if _recorder is not None:
            raise LedgerError("ledger recorders do not nest")
        _install_triton_hooks()
        stack = contextlib.ExitStack()
        # Triton's launchers size their grids for the SMs of the GPU; in the interpreter, for an H100's
        # (or as many as the counting asks for, see measure).
        stack.enter_context(_environment(ATTN_KERNELS_INTERPRETER_SMS=str(self.sms)))
        if backends.cuda_emulation_error() is None:
            stack.enter_context(_environment(ATTN_KERNELS_EMULATION_ORDERS="forward",  # one order: counted once
                                             ATTN_KERNELS_EMULATION_GRID="none" if self.dry_run else "all"))
            torch.ops.attn_kernels_emulated._launch_log(True)
            stack.callback(torch.ops.attn_kernels_emulated._launch_log, False)
        stack.enter_context(_TorchOps(self))
        self._stack = stack
        _recorder = self
        return self

    def __exit__(self, *exc):
        global _recorder
        self.take_emulated()
        _recorder = None
        self._stack.close()

    def take(self) -> List[Launch]:
        self.take_emulated()
        launches, self.launches = self.launches, []
        return launches

    def take_emulated(self):
        if backends.cuda_emulation_error() is not None:
            return
        for line in torch.ops.attn_kernels_emulated._launch_log(True).splitlines():
            name, grid, block, dynamic, shared, read, written, req_read, req_written, _ = line.split("\t")
            threads = math.prod(int(v) for v in block.split(","))
            self.launches.append(Launch(
                name=name, kind="cuda", read=int(read), written=int(written), requested_read=int(req_read),
                requested_written=int(req_written), grid=tuple(int(v) for v in grid.split(",")), threads=threads,
                shared=max(int(dynamic), int(shared))))

    def saved_tensors(self):
        """saved_tensors_hooks that note what autograd keeps."""
        def pack(t):
            key = _storage_key(t)
            if key not in self.parameters:
                self.saved[key] = t.untyped_storage().nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@contextlib.contextmanager
def _environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _install_triton_hooks():
    """Wraps the interpreter's launch and its loads and stores; they count only under a Recorder."""
    if not backends.triton_interpreted():
        return
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run
    if getattr(run, "_attn_ledger", False):
        return
    from attn_kernels.kernel_report import specialization

    builder = interpreter.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx

    def note(read, ptrs, mask):
        rec = _recorder
        if rec is not None and rec.in_kernel:
            addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
            rec._accesses.append((read, addresses, ptrs.get_element_ty().primitive_bitwidth // 8))

    def counted_load(ptrs, mask, other, *args):
        note(True, ptrs, mask)
        return load(ptrs, mask, other, *args)

    def counted_store(ptrs, value, mask, *args):
        note(False, ptrs, mask)
        return store(ptrs, value, mask, *args)

    def noted_grid_dim(*grid):
        if _recorder is not None:
            _recorder._grid = tuple(int(g) for g in grid)
        return set_grid_dim(*grid)

    def skipped_grid_idx(*idx):
        if _recorder is not None and _recorder.dry_run and _recorder.in_kernel:
            raise _Skipped()
        return set_grid_idx(*idx)

    def counted_run(self, *args, grid, warmup, **kwargs):
        rec = _recorder
        if rec is None or warmup or rec.in_kernel:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        spec = specialization(self, args, kwargs)
        rec.in_kernel, rec._accesses, rec._grid = True, [], None
        try:
            run(self, *args, grid=grid, warmup=warmup, **kwargs)
        except interpreter.InterpreterError as e:
            if not isinstance(e.__cause__, _Skipped):
                raise
        finally:
            rec.in_kernel = False
        totals = {}
        for read in (True, False):
            chunks = [(a, size) for r, a, size in rec._accesses if r == read]
            requested = sum(a.size * size for a, size in chunks)
            unique = sum(_distinct(np.concatenate([a for a, s in chunks if s == size])) * size
                         for size in {s for _, s in chunks})
            totals[read] = (unique, requested)
        rec._accesses = None
        module = self.fn.__module__.rpartition(".")[2]
        rec.launches.append(Launch(
            name=f"{module}:{self.fn.__name__}", kind="triton", read=totals[True][0], written=totals[False][0],
            requested_read=totals[True][1], requested_written=totals[False][1], grid=rec._grid or (1, 1, 1),
            threads=32 * spec["options"]["num_warps"], spec=spec))

    counted_run._attn_ledger = True
    interpreter.InterpretedFunction.run = counted_run
    interpreter._patch_lang = _patch_lang_once_per_launch(interpreter)
    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    builder.set_grid_dim, builder.set_grid_idx = noted_grid_dim, skipped_grid_idx


def _patch_lang_once_per_launch(interpreter):
    """The interpreter's _patch_lang, skipped for modules already patched during the running launch.

    A launch patches the language modules its kernel sees (inspect.getmembers over each) and
    restores them at its end; every call of a @triton.jit function from the kernel (tl.sum,
    tl.cdiv and our helpers) patches its own modules again, triton.language.core for the standard
    library, and never restores them. In SK's kernels, which make such calls per element tile, that
    was a quarter of the counting time. Here each module is patched once per launch; the patched
    functions are the same either way.
    """
    import triton.language as tl

    patch_lang = interpreter._patch_lang
    patched = set()  # ids of the language modules patched during the running launch

    def patch_lang_once(fn):
        modules = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if patched and modules <= patched:
            return interpreter._LangPatchScope()  # nothing patched, nothing to restore
        launch = not patched  # the kernel's own patch, restored at the launch's end
        scope = patch_lang(fn)
        patched.update(modules)
        if launch:
            restore = scope.restore

            def restore_and_end_launch():
                patched.clear()
                restore()

            scope.restore = restore_and_end_launch
        return scope

    return patch_lang_once


def _distinct(addresses) -> int:
    """The number of distinct values (sorting: numpy's hash-based unique is several times slower)."""
    if addresses.size == 0:
        return 0
    addresses = np.sort(addresses)
    return 1 + int(np.count_nonzero(addresses[1:] != addresses[:-1]))


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of t's elements, a broadcast (stride-0) dimension counted once."""
    if t.numel() == 0:
        return 0
    return math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0) * t.element_size()


# Ops that move no data (allocations, metadata, and _unsafe_view: a view of a fresh tensor that its
# schema does not mark as one, as matmul's and reshape's results), and ops that write their first
# argument without reading it.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "detach",
               "alias", "lift_fresh", "resize_", "_unsafe_view"}
_WRITE_ONLY_FIRST = {"fill_", "zero_", "copy_"}
_RUN_FOR_REAL = _NO_TRAFFIC | {"_local_scalar_dense", "item", "nonzero"}


def op_traffic(func, args, kwargs, out) -> Tuple[int, int]:
    """(bytes read, bytes written) of one aten op: its tensor inputs read, its outputs written."""
    name = func.overloadpacket.__name__
    if func.is_view or name in _NO_TRAFFIC:
        return 0, 0
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if name in _WRITE_ONLY_FIRST and inputs:
        inputs = inputs[1:]  # copy_(dst, src) reads src; fill_(t, value) reads a scalar at most
    outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def total(tensors):
        seen = {}
        for t in tensors:
            seen[(_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))] = tensor_bytes(t)
        return sum(seen.values())

    return total(inputs), total(outputs)


class _TorchOps(TorchDispatchMode):
    """Counts the aten ops run under it; runs attn_kernels' own ops with their launchers' torch ops
    counted and their kernels counted by the hooks."""

    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        if rec.in_kernel:  # the Triton interpreter's copies of a launch's arguments: host work
            return func(*args, **kwargs)
        if func.namespace in ("attn_kernels", "attn_kernels_emulated"):
            # Its CPU kernel, below this mode's dispatch key (calling func would come back here),
            # under a fresh instance of this mode that sees the ops the kernel calls.
            with _TorchOps(rec):
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            rec.take_emulated()
            return out
        if rec.fake_ops and func.overloadpacket.__name__ not in _RUN_FOR_REAL and not func.is_view:
            out = _on_fake(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        read, written = op_traffic(func, args, kwargs, out)
        if read or written:
            rec.take_emulated()  # keep the order of launches
            rec.launches.append(Launch(name=str(func).removeprefix("aten."), kind="torch", read=read,
                                       written=written, requested_read=read, requested_written=written))
        return out


def _on_fake(func, args, kwargs):
    """func run on fake twins of its tensor arguments (FakeTensorMode: shapes, strides and memory
    formats as the real kernels make them, no data); its outputs as uninitialized real tensors (an
    output that is an argument, as an in-place op's, is that argument)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode()
    twins = {}

    def to_fake(t):
        if not isinstance(t, torch.Tensor):
            return t
        twin = fake_mode.from_tensor(t)
        twins[id(twin)] = t
        return twin

    try:
        fake_args, fake_kwargs = pytree.tree_map(to_fake, args), pytree.tree_map(to_fake, kwargs)
        with fake_mode:
            out = func(*fake_args, **fake_kwargs)
    except (NotImplementedError, RuntimeError):  # no fake kernel: run it (a dry run's ops are small)
        return func(*args, **kwargs)

    def back(t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in twins:
            return twins[id(t)]
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)

    return pytree.tree_map(back, out)


# ---- one block at one shape ------------------------------------------------------------------------

@dataclass
class Counted:
    launches: Dict[str, List[Launch]]  # direction -> launches
    saved: int                         # bytes saved for backward


def count_module(module: torch.nn.Module, x: torch.Tensor, dry_run: bool = False, fake_ops: bool = False,
                 sms: int = SMS) -> Counted:
    """The launches of module(x) and of its backward for a dy of y's shape (see Recorder)."""
    x = x.detach().requires_grad_()
    leaves = [x] + [p for p in module.parameters() if p.requires_grad]
    rec = Recorder(dry_run, fake_ops, sms)
    rec.parameters = {_storage_key(p) for p in module.parameters()}
    with rec:
        with rec.saved_tensors():
            y = module(x)
        fwd = rec.take()
        dy = torch.empty_like(y) if rec.fake_ops or y.device.type == "meta" else torch.randn_like(y)
        rec.take()  # making dy is not the backward's work
        torch.autograd.grad(y, leaves, dy, allow_unused=True)
        bwd = rec.take()
    return Counted({"fwd": fwd, "bwd": bwd}, sum(rec.saved.values()))


def make_input(n, c, h, w, dtype, layout, device="cpu", empty=False):
    shape = (n, c, h, w)
    if empty or device == "meta":
        return torch.empty(shape, dtype=dtype, device=device, memory_format=LAYOUTS[layout])
    return torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=LAYOUTS[layout])


def kernels_of(launches):
    return [launch for launch in launches if launch.kind != "torch"]


def scaled_to(dry: Counted, small: Dict[int, Counted], n: int) -> Tuple[Dict[str, List[Launch]], bool]:
    """The dry run's launches at N = n with each kernel's bytes extrapolated from the two small
    batches n1 < n2 of `small`, and whether that is exact (same kernels, block sizes, and grids
    affine in N)."""
    (n1, at_1), (n2, at_2) = sorted(small.items())
    exact = True
    result = {}
    for direction, launches in dry.launches.items():
        k1, k2 = kernels_of(at_1.launches[direction]), kernels_of(at_2.launches[direction])
        kn = kernels_of(launches)
        if [k.name for k in k1] != [k.name for k in k2]:
            raise LedgerError(f"{direction}: the kernels launched at N = {n1} and N = {n2} differ: "
                              f"{[k.name for k in k1]} vs {[k.name for k in k2]}")
        if [k.name for k in kn] != [k.name for k in k1]:
            raise LedgerError(f"{direction}: the kernels launched at N = {n} differ from those at N = {n1}: "
                              f"{[k.name for k in kn]} vs {[k.name for k in k1]}")
        scaled = {}
        for a, b, real in zip(k1, k2, kn):
            affine_grid = tuple(ga + (gb - ga) * (n - n1) // (n2 - n1) for ga, gb in zip(a.grid, b.grid))
            exact &= real.threads == a.threads and real.grid == affine_grid

            def at_n(field_name):
                va, vb = getattr(a, field_name), getattr(b, field_name)
                return va + (vb - va) * (n - n1) // (n2 - n1)

            scaled[id(real)] = replace(real, read=at_n("read"), written=at_n("written"),
                                       requested_read=at_n("requested_read"),
                                       requested_written=at_n("requested_written"),
                                       shared=max(real.shared, a.shared))  # static shared: known once run
        result[direction] = [scaled.get(id(launch), launch) for launch in launches]
    return result, exact


@dataclass
class Case:
    block: str
    backend: str  # the fused path's kernel backend
    c: int
    h: int
    w: int
    dtype: str
    layout: str

    def __str__(self):
        return f"{self.block} {self.c}x{self.h}x{self.w} {self.dtype} {self.layout} {self.backend}"


@dataclass
class Measured:
    """A case counted at each batch size: direction -> launches, and the bytes saved for backward."""
    case: Case
    eager: Dict[int, Counted]
    fused: Dict[int, Counted]
    exact: Dict[int, bool]
    counted_at: Dict[int, Tuple[int, int, int]]  # the two batch sizes the kernels were counted at, and the SMs
    seconds: float


@contextlib.contextmanager
def _training(module: torch.nn.Module, mode: bool):
    was = module.training
    module.train(mode)
    try:
        yield
    finally:
        module.train(was)


def _kernel_names(counted: Counted) -> Dict[str, List[str]]:
    return {d: [k.name for k in kernels_of(launches)] for d, launches in counted.launches.items()}


def counting_pair(launches_wanted, n: int) -> Optional[int]:
    """The smallest n1 < n such that batches n1 and n1 + 1 launch the kernels launched at n, or None.

    A launcher may choose its kernels from N: a split of C, and the kernel combining it, where the
    samples alone would leave SMs idle. So the batches launching n's kernels are those below a
    threshold (n1 = 1) or those from one on: bisected, then checked, with a scan from 1 where the
    check fails. Each probe is a dry run, which costs a fraction of a second; the scan took 48 of
    them for CBAM at N = 128."""
    if launches_wanted(1) and launches_wanted(2):
        return 1
    low, high = 1, n  # launches_wanted(n) holds
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if launches_wanted(middle) else (middle, high)
    if high < n and launches_wanted(high + 1):
        return high
    return next((k for k in range(1, n) if launches_wanted(k) and launches_wanted(k + 1)), None)


def measure(case: Case, batches: List[int]) -> Measured:
    start = time.perf_counter()
    block, dtype = BLOCKS[case.block], DTYPES[case.dtype]
    shape = (case.c, case.h, case.w)
    torch.manual_seed(0)
    eager_module = block.eager(case.c).to(dtype)
    eager = {n: count_module(eager_module.to("meta"), make_input(n, *shape, dtype, case.layout, device="meta"))
             for n in batches}
    fused, exact, counted_at, small = {}, {}, {}, {}
    with backends.use_backend(case.backend):
        module = block.fused(case.c).to(dtype)

        def at(n, sms):  # the kernels counted at batch n; the torch ops around them need not compute
            if (n, sms) not in small:
                with _training(module, case.block not in COUNTED_IN_EVAL):
                    small[n, sms] = count_module(module, make_input(n, *shape, dtype, case.layout), fake_ops=True,
                                                 sms=sms)
            return small[n, sms]

        def dry_run(n, small_batch=True, sms=SMS):
            with _training(module, not small_batch or case.block not in COUNTED_IN_EVAL):
                return count_module(module, make_input(n, *shape, dtype, case.layout, empty=True), dry_run=True,
                                    sms=sms)

        names_at = {}

        def launches_wanted(n, wanted, sms=SMS):
            if (n, sms) not in names_at:
                names_at[n, sms] = _kernel_names(dry_run(n, sms=sms))
            return names_at[n, sms] == wanted

        for n in batches:
            dry = dry_run(n, small_batch=False)
            wanted = _kernel_names(dry)
            n1, sms = counting_pair(lambda k: launches_wanted(k, wanted), n), SMS
            if n1 != 1 and case.backend == "triton" and all(launches_wanted(k, wanted, sms=1) for k in (1, 2)):
                # Triton's launchers split their work to fill the SMs they are told of: for 132, the
                # unsplit kernels of N = 128 start only from N = 8 or so at 256x56x56, which the
                # interpreter counts several times slower than N = 1 and 2 sized for one SM. The
                # grids are checked against the dry run's at N as always: exact where affine in N.
                n1, sms = 1, 1
            if n1 is None:
                raise LedgerError(f"{case}: no batch sizes below N = {n} launch the kernels launched at N = {n}: "
                                  f"{wanted}")
            counted_at[n] = (n1, n1 + 1, sms)
            launches, exact[n] = scaled_to(dry, {k: at(k, sms) for k in (n1, n1 + 1)}, n)
            fused[n] = Counted(launches, dry.saved)
    kinds = {launch.kind for counted in fused.values() for ls in counted.launches.values() for launch in ls}
    if case.backend not in kinds:
        raise LedgerError(f"{case}: no {case.backend} kernel ran (the fused path fell back to another backend)")
    return Measured(case, eager, fused, exact, counted_at, time.perf_counter() - start)


# ---- registers and shared memory: the kernels compiled for sm_90a ----------------------------------

_TYPE_NAMES = [("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("double", "fp64"), ("float", "fp32")]


def cuda_instance(emulated_name: str) -> str:
    """The emulation's kernel name as kernel_report names the instantiation ptxas compiled:
    reduce_nchw_kernel<Reduce::kPool, false, c10::BFloat16, float> -> reduce_nchw_kernel<0, false, bf16, fp32>."""
    name = emulated_name
    for long, short in _TYPE_NAMES:
        name = re.sub(rf"\b{re.escape(long)}\b", short, name)
    return re.sub(r"Reduce::k(\w+)", lambda m: str(_reduce_modes().index(m.group(1))), name)


def _reduce_modes() -> List[str]:
    with open(os.path.join(_ROOT, "csrc", "reduce_hw.cuh")) as f:
        body = re.search(r"enum class Reduce \{([^}]*)\}", f.read()).group(1)
    return [v.strip().removeprefix("k") for v in body.split(",")]


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_resources(triton_specs: List[dict], with_cuda: bool, log) -> Tuple[dict, List[str]]:
    """Registers and shared memory per kernel: {('cuda', instance) or ('triton', spec json): result},
    from `python -m attn_kernels.kernel_report` in a child process (TRITON_INTERPRET unset there,
    so the Triton kernels compile for the GPU), and the reasons for what could not be compiled."""
    from attn_kernels import kernel_report

    resources, missing = {}, []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "attn_kernels.kernel_report", "--targets", "90", "--json",
                   os.path.join(tmp, "resources.json"), "--allow-nan-ignoring"]
        if triton_specs:
            with open(os.path.join(tmp, "specs.jsonl"), "w") as f:
                f.writelines(json.dumps(s, sort_keys=True) + "\n" for s in triton_specs)
            command += ["--specs", os.path.join(tmp, "specs.jsonl")]
        if with_cuda and kernel_report.cuda_home() is None:
            missing.append("CUDA kernels: no CUDA toolkit (nvcc) to compile csrc/ for sm_90a")
            with_cuda = False
        if with_cuda:
            command.append("--cuda")
        if not triton_specs and not with_cuda:
            return resources, missing
        log(f"compiling {len(triton_specs)} Triton specializations{' and csrc/' if with_cuda else ''} "
            "for sm_90a (registers, shared memory) ...")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        path = os.path.join(tmp, "resources.json")
        if not os.path.exists(path):
            missing.append(f"kernel_report failed: {(done.stdout + done.stderr)[-2000:]}")
            return resources, missing
        with open(path) as f:
            for result in json.load(f):
                if result.get("error"):
                    missing.append(f"{result['kernel']}: {result['error'][:300]}")
                elif "spec" in result:
                    resources[("triton", json.dumps(result["spec"], sort_keys=True))] = result
                else:
                    resources[("cuda", result["instance"])] = result
    return resources, missing


def resources_of(launch: Launch, resources: dict) -> Optional[dict]:
    if launch.kind == "cuda":
        return resources.get(("cuda", cuda_instance(launch.name)))
    return resources.get(("triton", json.dumps(launch.spec, sort_keys=True)))


# ---- occupancy on an H100 --------------------------------------------------------------------------

def occupancy(launch: Launch, registers: Optional[int], shared: int, x_fraction: float) -> dict:
    """Blocks resident per SM and what limits them, warps in flight, waves, and bytes in flight.
    x_fraction: the launch's bytes over |x|; from ACTIVATION_PASS_FRACTION on, the fill rule applies."""
    warps = max(1, math.ceil(launch.threads / 32))
    limits = {"blocks": BLOCKS_PER_SM, "threads": THREADS_PER_SM // (warps * 32)}
    if registers:
        per_warp = math.ceil(registers * 32 / 256) * 256  # allocated per warp in units of 256
        limits["registers"] = (REGISTERS_PER_SM // per_warp) // warps
    limits["shared memory"] = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    per_sm = min(limits.values())
    limiter = min(limits, key=limits.get)
    blocks = math.prod(launch.grid)
    resident = min(blocks, per_sm * SMS)  # blocks in flight in the first wave
    warps_in_flight = resident * warps
    # Bytes in flight: each resident thread with one access outstanding of its average width (at
    # most 16 bytes): a lower bound for kernels that unroll their loads.
    threads_total = blocks * launch.threads
    width = min(16.0, (launch.requested_read + launch.requested_written) / max(1, threads_total))
    return {
        "blocks_per_sm": per_sm, "limiter": limiter, "waves": blocks / max(1, per_sm * SMS),
        "warps_per_sm": warps_in_flight / SMS, "warps_in_flight": warps_in_flight,
        "bytes_in_flight_per_sm": warps_in_flight * 32 * width / SMS,
        "idle": warps_in_flight < WARPS_IN_FLIGHT_WANTED and x_fraction >= ACTIVATION_PASS_FRACTION,
    }


# ---- rows: the ledger and the occupancy tables -----------------------------------------------------

LEDGER_COLUMNS = [
    "block", "impl", "direction", "n", "c", "h", "w", "dtype", "layout", "x_mb", "read_mb", "written_mb",
    "requested_read_mb", "requested_written_mb", "launches", "kernel_launches", "floor_mb", "over_floor",
    "eager_over_fused_bytes", "eager_over_fused_launches", "saved_mb", "saved_over_x",
    "est_h100_us", "est_h200_us", "floor_h100_us", "floor_h200_us", "counting", "torch", "triton", "commit", "date",
]
OCCUPANCY_COLUMNS = [
    "block", "impl", "direction", "n", "c", "h", "w", "dtype", "layout", "kernel", "grid", "threads", "registers",
    "spilled_bytes", "shared_bytes", "blocks_per_sm", "limiter", "warps_per_sm", "warps_in_flight", "waves",
    "bytes_in_flight_per_sm", "x_fraction", "idle", "commit", "date",
]
MB = 1e6


def _totals(launches: List[Launch]) -> dict:
    return {
        "read": sum(launch.read for launch in launches), "written": sum(launch.written for launch in launches),
        "requested_read": sum(launch.requested_read for launch in launches),
        "requested_written": sum(launch.requested_written for launch in launches),
        "launches": len(launches), "kernel_launches": len(kernels_of(launches)),
    }


def estimate_us(bytes_moved: float, launches: int, gpu: str) -> float:
    """An estimate, not a measurement: bytes over the copy bandwidth plus LAUNCH_US per launch."""
    return bytes_moved / (BANDWIDTH_TBPS[gpu] * 1e6) + launches * LAUNCH_US


def ledger_rows(m: Measured, environment: dict) -> List[dict]:
    case, passes = m.case, BLOCKS[m.case.block].passes
    rows = []
    for n in sorted(m.fused):
        x_bytes = n * case.c * case.h * case.w * DTYPES[case.dtype].itemsize
        per_impl = {}
        for impl, counted in (("eager", m.eager[n]), (f"fused:{case.backend}", m.fused[n])):
            per_dir = {d: _totals(counted.launches[d]) for d in DIRECTIONS}
            per_dir["fwd+bwd"] = {k: per_dir["fwd"][k] + per_dir["bwd"][k] for k in per_dir["fwd"]}
            per_impl[impl] = (per_dir, counted.saved)
        eager_dirs = per_impl["eager"][0]
        for impl, (per_dir, saved) in per_impl.items():
            for direction, t in per_dir.items():
                moved = t["read"] + t["written"]
                floor = passes[direction] * x_bytes if passes else None
                eager_moved = eager_dirs[direction]["read"] + eager_dirs[direction]["written"]
                fused = impl != "eager"
                rows.append({
                    "block": case.block, "impl": impl, "direction": direction, "n": n, "c": case.c, "h": case.h,
                    "w": case.w, "dtype": case.dtype, "layout": case.layout, "x_mb": x_bytes / MB,
                    "read_mb": t["read"] / MB, "written_mb": t["written"] / MB,
                    "requested_read_mb": t["requested_read"] / MB, "requested_written_mb": t["requested_written"] / MB,
                    "launches": t["launches"], "kernel_launches": t["kernel_launches"],
                    "floor_mb": floor / MB if floor else None, "over_floor": moved / floor if floor else None,
                    "eager_over_fused_bytes": eager_moved / moved if fused and moved else None,
                    "eager_over_fused_launches": eager_dirs[direction]["launches"] / t["launches"] if fused else None,
                    "saved_mb": saved / MB, "saved_over_x": saved / x_bytes,
                    "est_h100_us": estimate_us(moved, t["launches"], "H100"),
                    "est_h200_us": estimate_us(moved, t["launches"], "H200"),
                    "floor_h100_us": floor / (BANDWIDTH_TBPS["H100"] * 1e6) if floor else None,
                    "floor_h200_us": floor / (BANDWIDTH_TBPS["H200"] * 1e6) if floor else None,
                    "counting": ("meta tensors at N (exact)" if not fused else
                                 f"kernels from N={m.counted_at[n][0]},{m.counted_at[n][1]}"
                                 + (f" (grids for {m.counted_at[n][2]} SM)" if m.counted_at[n][2] != SMS else "")
                                 + ": "
                                 + ("exact" if m.exact[n] else "approximate (a grid not affine in N)")),
                    **environment,
                })
    return rows


def occupancy_rows(m: Measured, resources: dict, environment: dict) -> List[dict]:
    case = m.case
    rows = []
    for n, counted in sorted(m.fused.items()):
        x_bytes = n * case.c * case.h * case.w * DTYPES[case.dtype].itemsize
        for direction in DIRECTIONS:
            for launch in kernels_of(counted.launches[direction]):
                compiled = resources_of(launch, resources)
                registers = compiled["registers"] if compiled else None
                spilled = compiled["spill_stores"] + compiled["spill_loads"] if compiled else None
                shared = launch.shared if launch.kind == "cuda" else (compiled["shared"] if compiled else 0)
                x_fraction = (launch.read + launch.written) / x_bytes
                occ = occupancy(launch, registers, shared, x_fraction)
                rows.append({
                    "block": case.block, "impl": f"fused:{case.backend}", "direction": direction, "n": n,
                    "c": case.c, "h": case.h, "w": case.w, "dtype": case.dtype, "layout": case.layout,
                    "kernel": launch.name, "grid": "x".join(map(str, launch.grid)), "threads": launch.threads,
                    "registers": registers, "spilled_bytes": spilled, "shared_bytes": shared,
                    "x_fraction": x_fraction,
                    "commit": environment["commit"], "date": environment["date"], **occ,
                })
    return rows


# ---- output: screen, CSV, PNG, README --------------------------------------------------------------

def _fmt(value, spec="{:.2f}"):
    return "-" if value is None else spec.format(value)


def print_ledger(rows: List[dict], out=sys.stdout):
    head = ("block", "shape", "N", "dtype", "layout", "dir", "eager MB", "fused MB", "floor MB", "fused/fl",
            "eager/fused", "launches e/f", "saved e/f |x|", "est H100 us e/f/floor", "backend")
    line = "{:<11} {:<12} {:>3} {:<4} {:<13} {:<7} {:>9} {:>9} {:>9} {:>8} {:>11} {:>12} {:>13} {:>21} {}"
    print(line.format(*head), file=out)
    eager = {_key(r): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        if r["impl"] == "eager":
            continue
        e = eager[_key(r)]
        print(line.format(
            r["block"], f"{r['c']}x{r['h']}x{r['w']}", r["n"], r["dtype"], r["layout"], r["direction"],
            f"{e['read_mb'] + e['written_mb']:.1f}", f"{r['read_mb'] + r['written_mb']:.1f}",
            _fmt(r["floor_mb"], "{:.1f}"), _fmt(r["over_floor"]), _fmt(r["eager_over_fused_bytes"]),
            f"{e['launches']}/{r['launches']}", f"{e['saved_over_x']:.2f}/{r['saved_over_x']:.2f}",
            f"{e['est_h100_us']:.0f}/{r['est_h100_us']:.0f}/{_fmt(r['floor_h100_us'], '{:.0f}')}",
            r["impl"].split(":")[1] + ("" if r["counting"].endswith("exact") else " ~")), file=out)


def _key(r):
    return (r["block"], r["direction"], r["n"], r["c"], r["h"], r["w"], r["dtype"], r["layout"])


def print_occupancy(rows: List[dict], out=sys.stdout):
    """Every launch that leaves the GPU idle, then each kernel's fewest warps in flight."""
    line = "{:<11} {:<12} {:>3} {:<4} {:<13} {:<4} {:<58} {:>10} {:>4} {:>4} {:>6} {:>3} {:<13} {:>6} {:>6} {:>9}"
    head = ("block", "shape", "N", "dtype", "layout", "dir", "kernel", "grid", "thr", "regs", "smem", "b/SM",
            "limiter", "warps", "waves", "KB/SM")

    def show(r):
        print(line.format(
            r["block"], f"{r['c']}x{r['h']}x{r['w']}", r["n"], r["dtype"], r["layout"], r["direction"],
            r["kernel"][:58], r["grid"], r["threads"], _fmt(r["registers"], "{}"), r["shared_bytes"],
            r["blocks_per_sm"], r["limiter"], r["warps_in_flight"], f"{r['waves']:.2f}",
            f"{r['bytes_in_flight_per_sm'] / 1024:.1f}"), file=out)

    spilling = sorted({(r["impl"], r["kernel"], r["dtype"], r["layout"], f"{r['c']}x{r['h']}x{r['w']}",
                        r["spilled_bytes"]) for r in rows if r["spilled_bytes"]})
    print(f"\nLaunches whose kernel spills registers (sm_90a; bytes stored + loaded per thread): "
          f"{len(spilling) or 'none'}", file=out)
    for impl, kernel, dtype, layout, shape, spilled in spilling:
        print(f"  {impl} {kernel} {dtype} {layout} {shape}: {spilled} B", file=out)
    idle = [r for r in rows if r["idle"]]
    print(f"\nLaunches that leave an H100 idle: an activation-sized pass (>= {ACTIVATION_PASS_FRACTION:g} |x|) "
          f"with fewer than {WARPS_IN_FLIGHT_WANTED} warps in flight ({len(idle)} of {len(rows)} launches):", file=out)
    print(line.format(*head), file=out)
    for r in idle:
        show(r)
    print("\nEach kernel's launch with the fewest warps in flight (activation-sized passes):", file=out)
    print(line.format(*head), file=out)
    worst = {}
    for r in rows:
        if r["x_fraction"] >= ACTIVATION_PASS_FRACTION:
            k = (r["impl"], r["kernel"].split("<")[0])
            if k not in worst or r["warps_in_flight"] < worst[k]["warps_in_flight"]:
                worst[k] = r
    for r in sorted(worst.values(), key=lambda r: r["warps_in_flight"]):
        show(r)


def write_csv(path: str, columns: List[str], rows: List[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


README_STAGES = [STAGES[0], STAGES[-1]]  # the first and last ResNet-50 stages
README_BEGIN = "<!-- ledger:begin (generated: python -m attn_kernels.ledger --readme-only README.md; do not edit) -->"
README_END = "<!-- ledger:end -->"


def readme_table(rows: List[dict]) -> str:
    """The README's traffic table: per block and stage, bf16, channels_last, N = 32, in units of |x|."""
    pick = {(r["block"], r["impl"] == "eager", r["direction"], int(r["c"])): r for r in rows
            if r["dtype"] == "bf16" and r["layout"] == "channels_last" and int(r["n"]) == 32}
    lines = [
        "| block | C×H×W | fwd: eager / fused / floor | bwd: eager / fused / floor | launches fwd, bwd: eager / fused "
        "| saved for bwd: eager / fused | est. H100 fwd+bwd µs: eager / fused / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    for block in blocks:
        for c, h, w in README_STAGES:
            got = {(eager, d): pick.get((block, eager, d, c)) for eager in (True, False) for d in ("fwd", "bwd", "fwd+bwd")}
            if any(v is None for v in got.values()):
                continue
            x = float(got[True, "fwd"]["x_mb"])

            def mult(r):
                return f"{(float(r['read_mb']) + float(r['written_mb'])) / x:.2f}"

            def floor(d):
                v = got[False, d]["floor_mb"]
                return f"{float(v) / x:.2f}" if v else "-"

            fb_e, fb_f = got[True, "fwd+bwd"], got[False, "fwd+bwd"]
            floor_us = f"{float(fb_f['floor_h100_us']):.0f}" if fb_f["floor_h100_us"] else "-"
            approx = "" if got[False, "fwd"]["counting"].endswith("exact") else " ~"
            lines.append(
                f"| {block} ({got[False, 'fwd']['impl'].split(':')[1]}) | {c}×{h}×{w} | "
                f"{mult(got[True, 'fwd'])} / {mult(got[False, 'fwd'])}{approx} / {floor('fwd')} | "
                f"{mult(got[True, 'bwd'])} / {mult(got[False, 'bwd'])}{approx} / {floor('bwd')} | "
                f"{got[True, 'fwd']['launches']}, {got[True, 'bwd']['launches']} / "
                f"{got[False, 'fwd']['launches']}, {got[False, 'bwd']['launches']} | "
                f"{float(got[True, 'fwd']['saved_over_x']):.2f} / {float(got[False, 'fwd']['saved_over_x']):.2f} | "
                f"{float(fb_e['est_h100_us']):.0f} / {float(fb_f['est_h100_us']):.0f} / {floor_us} |")
    return "\n".join(lines)


def update_readme(readme: str, table: str) -> str:
    begin, end = readme.index(README_BEGIN), readme.index(README_END)
    return readme[:begin + len(README_BEGIN)] + "\n" + table + "\n" + readme[end:]


def plot(rows: List[dict], png: str) -> Optional[str]:
    """Bars per block and stage: eager, fused and floor fwd+bwd bytes in units of |x| (bf16, channels_last, N = 32)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    sel = [r for r in rows if r["dtype"] == "bf16" and r["layout"] == "channels_last" and int(r["n"]) == 32
           and r["direction"] == "fwd+bwd"]
    labels = list(dict.fromkeys(f"{r['block']}\n{r['c']}x{r['h']}²" for r in sel))
    value = {}
    for r in sel:
        label = f"{r['block']}\n{r['c']}x{r['h']}²"
        x = float(r["x_mb"])
        value[label, "eager" if r["impl"] == "eager" else "fused"] = (float(r["read_mb"]) + float(r["written_mb"])) / x
        if r["floor_mb"] not in (None, ""):
            value[label, "floor"] = float(r["floor_mb"]) / x
    figure, axes = pyplot.subplots(figsize=(max(8, 0.55 * len(labels) + 2), 5))
    for i, series in enumerate(("eager", "fused", "floor")):
        xs = [k + (i - 1) * 0.27 for k, label in enumerate(labels) if (label, series) in value]
        axes.bar(xs, [value[label, series] for label in labels if (label, series) in value], 0.27, label=series)
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, fontsize=6)
    axes.set_ylabel("DRAM bytes, fwd+bwd, in units of |x|")
    axes.set_title("attn_kernels ledger: bytes counted on CPU (bf16, channels_last, N = 32); not a GPU timing")
    axes.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    pyplot.close(figure)
    return None


# ---- the command -----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m attn_kernels.ledger", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--blocks", nargs="+", choices=sorted({*KERNEL_BACKENDS, *NOT_COUNTED}), default=list(KERNEL_BACKENDS),
        help="blocks to count (default: every block with fused kernels)")
    add("--stages", nargs="+", help="CxHxW shapes (default: the four ResNet-50 stages; --quick: the first and last)")
    add("--batch", nargs="+", type=int, help="batch sizes (default: 32 128; --quick: 32)")
    add("--dtypes", nargs="+", choices=sorted(DTYPES), help="(default: bf16 fp32; --quick: bf16)")
    add("--layouts", nargs="+", choices=list(LAYOUTS), help="(default: both; --quick: channels_last)")
    add("--quick", action="store_true", help="a smaller default: N = 32, bf16, channels_last, two stages")
    add("--all-backends", action="store_true",
        help="count every kernel backend of a block (default: the one 'auto' takes on a GPU; the Triton "
             "interpreter is slow: about 10 s per case more)")
    add("--jobs", type=int, default=os.cpu_count() or 1, help="processes counting cases (default: one per core)")
    add("--no-compile", action="store_true", help="skip compiling the kernels for registers and shared memory")
    add("--out", default=os.path.join("benchmarks", "results"),
        help="folder of ledger.csv, occupancy.csv and ledger.png (default: %(default)s)")
    add("--readme", help="also regenerate the traffic table between the ledger markers of this README")
    add("--readme-only", metavar="README", help="regenerate README's table from --out's ledger.csv and stop")
    args = p.parse_args(argv)
    stages = [STAGES[0], STAGES[-1]] if args.quick else STAGES
    args.stages = args.stages or [f"{c}x{h}x{w}" for c, h, w in stages]
    args.batch = args.batch or ([32] if args.quick else [32, 128])
    args.dtypes = args.dtypes or (["bf16"] if args.quick else ["bf16", "fp32"])
    args.layouts = args.layouts or (["channels_last"] if args.quick else list(LAYOUTS))
    try:
        args.stages = [tuple(int(v) for v in s.lower().split("x")) for s in args.stages]
        assert all(len(s) == 3 and min(s) > 0 for s in args.stages)
    except (ValueError, AssertionError):
        p.error(f"--stages: each shape is CxHxW with positive sizes, got {args.stages}")
    if any(n < 1 for n in args.batch):
        p.error(f"--batch sizes must be positive, got {args.batch}")
    return args


def _measure_logged(job):
    case, batches = job
    torch.set_num_threads(1)  # one process per core
    try:
        return measure(case, batches), None
    except Exception as e:  # reported with its case, the other cases go on
        import traceback

        return case, f"{case}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.readme_only:
        path = os.path.join(args.out, "ledger.csv")
        with open(args.readme_only) as f:
            text = f.read()
        with open(args.readme_only, "w") as f:
            f.write(update_readme(text, readme_table(read_csv(path))))
        print(f"{args.readme_only}: traffic table regenerated from {path}")
        return 0
    if not backends.triton_interpreted():
        # The ledger runs the Triton kernels in the interpreter (on a GPU machine too): it must be
        # on before triton is imported, so in a fresh process.
        os.environ["TRITON_INTERPRET"] = "1"
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.call([sys.executable, "-m", "attn_kernels.ledger", *argv])
    import triton

    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:5.0f} s] {message}", flush=True)

    environment = {"torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for block in [b for b in args.blocks if b in NOT_COUNTED]:
        log(f"skipped {block}: {NOT_COUNTED[block]}")
    cases = [Case(block, backend, c, h, w, dtype, layout)
             for block in args.blocks if block in KERNEL_BACKENDS
             for backend in (KERNEL_BACKENDS[block] if args.all_backends else KERNEL_BACKENDS[block][:1])
             for c, h, w in args.stages for dtype in args.dtypes for layout in args.layouts]
    unavailable = {b: why for b in ("cuda", "triton")
                   if (why := backends.unavailable_reason(b, torch.empty(1, 1, 1, 1)))}
    for case in [c for c in cases if c.backend in unavailable]:
        log(f"skipped {case}: {unavailable[case.backend]}")
    cases = [c for c in cases if c.backend not in unavailable]
    log(f"counting {len(cases)} cases: kernels at two small batches, torch ops and launches at "
        f"N = {', '.join(map(str, args.batch))} (dry runs, eager on meta), {args.jobs} processes")
    measured, failures = [], []
    # Longest first, so that no process is left with a long case at the end: a case's time grows
    # with C*H*W, and the Triton interpreter's several times over the emulation's.
    jobs = sorted(((c, args.batch) for c in cases),
                  key=lambda job: -job[0].c * job[0].h * job[0].w * (4 if job[0].backend == "triton" else 1))
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:  # spawned: autograd's threads do not survive a fork
            import concurrent.futures
            import multiprocessing

            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn")))
            results = pool.map(_measure_logged, jobs)
        else:
            results = map(_measure_logged, jobs)
        for k, (result, error) in enumerate(results, 1):
            if error:
                failures.append(error)
                log(f"[{k}/{len(cases)}] FAILED {error.splitlines()[0]}")
            else:
                measured.append(result)
                log(f"[{k}/{len(cases)}] {result.case} ({result.seconds:.1f} s)")
    measured.sort(key=lambda m: cases.index(m.case))  # the tables in the order of the arguments
    resources, missing = {}, []
    if not args.no_compile:
        specs = {json.dumps(launch.spec, sort_keys=True): launch.spec for m in measured for c in m.fused.values()
                 for ls in c.launches.values() for launch in ls if launch.kind == "triton"}
        with_cuda = any(m.case.backend == "cuda" for m in measured)
        resources, missing = compile_resources(list(specs.values()), with_cuda, log)
        for why in missing:
            log(f"no registers for {why}")
    ledger = [row for m in measured for row in ledger_rows(m, environment)]
    occupancy_table = [row for m in measured for row in occupancy_rows(m, resources, environment)]
    print()
    print("Ledger: DRAM bytes (read + written, each byte of a tensor once per launch) and launches, counted on "
          "this machine's CPU;\n'est' columns are ESTIMATES for an H100 (bytes / "
          f"{BANDWIDTH_TBPS['H100']} TB/s + {LAUNCH_US:g} us per launch), not measurements. "
          "'~': kernel bytes extrapolated from two small batches where a grid is not affine in N.\n")
    print_ledger(ledger)
    print_occupancy(occupancy_table)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "ledger.csv"), LEDGER_COLUMNS, ledger)
    write_csv(os.path.join(args.out, "occupancy.csv"), OCCUPANCY_COLUMNS, occupancy_table)
    why_no_png = plot(ledger, os.path.join(args.out, "ledger.png"))
    log(f"wrote {args.out}/ledger.csv, occupancy.csv" + (f"; {why_no_png}" if why_no_png else ", ledger.png"))
    if args.readme:
        main(["--readme-only", args.readme, "--out", args.out])
    for failure in failures:
        print(f"\nFAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
