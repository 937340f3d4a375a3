"""Which backend computes a block for a given input, and why the others were passed over.

Backends:
  'cuda'       the compiled CUDA extension (csrc/), for CUDA tensors; for CPU tensors, the same
               kernels under the CPU emulation of CUDA (attn_kernels._emulated), where built
  'triton'     the Triton kernels, for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  'reference'  pure PyTorch (attn_kernels.reference): any device, dtype and layout
  'auto'       (default) 'cuda', else 'triton', else 'reference'; CPU tensors go to 'reference'

Choose with `set_backend(name)`, `with use_backend(name):` or the environment variable
ATTN_KERNELS_BACKEND. An input the chosen backend cannot take goes to the next one that can;
`dispatch(x)` (or a module's `.dispatch(x)`) says which backend runs and why others did not.
"""
import contextlib
import importlib.util
import json
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "dispatch", "Dispatch", "unavailable_reason"]

BACKENDS = ("auto", "cuda", "triton", "reference")
KERNEL_BACKENDS = ("cuda", "triton")  # the order 'auto' tries them in
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ENV_VAR = "ATTN_KERNELS_BACKEND"
CUDA_MAX_ELEMENTS = 2**34

def _validated(name, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name


_backend = _validated(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def set_backend(name: str) -> None:
    """Select the backend for every fused block from now on ('auto', 'cuda', 'triton', 'reference')."""
    global _backend
    _backend = _validated(name, "backend")


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Select a backend inside a `with` block, restoring the previous one after it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# The checks below are constant for a process; torch.compile evaluates them once while tracing.
_status_cache: Dict[str, Optional[str]] = {}


@torch.compiler.assume_constant_result
def cuda_extension_error() -> Optional[str]:
    """Why the compiled extension cannot be used, or None when it is loaded."""
    if "cuda" not in _status_cache:
        try:
            from . import _C  # noqa: F401  (loading it registers torch.ops.attn_kernels_cuda)

            _status_cache["cuda"] = None
        except ImportError as e:
            _status_cache["cuda"] = (
                f"the CUDA extension attn_kernels._C is not built ({e}); "
                "run `python -m attn_kernels.info` for how to build it"
            )
    return _status_cache["cuda"]


@torch.compiler.assume_constant_result
def cuda_emulation_error() -> Optional[str]:
    """Why the CPU emulation of the CUDA kernels cannot be used, or None when it is loaded."""
    if "emulation" not in _status_cache:
        try:
            from . import _emulated  # noqa: F401  (loading it registers torch.ops.attn_kernels_emulated)

            _status_cache["emulation"] = None
        except ImportError:
            _status_cache["emulation"] = (
                "the cuda backend runs on CUDA tensors, or on CPU tensors where the CUDA emulation "
                "attn_kernels._emulated is built (ATTN_KERNELS_BUILD_EMULATION=1)"
            )
    return _status_cache["emulation"]


def cuda_build_info() -> dict:
    """What setup.py recorded when it compiled the extension (arch list, torch and CUDA versions)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def arch_list_runs_on(arch_list: str, major: int, minor: int) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST=arch_list (e.g. "8.0;9.0a", "8.6 9.0+PTX") runs on
    a GPU of compute capability major.minor: machine code for exactly that capability, with or
    without the arch-specific suffix (9.0a code runs on 9.0 GPUs only, 10.0f on the 10.x family),
    or PTX of an older plain capability that the driver compiles at load. An empty list is torch's
    default (the visible GPUs when it was built): taken as able to run."""
    entries = arch_list.replace(";", " ").split()
    if not entries:
        return True
    for entry in entries:
        arch, _, ptx = entry.partition("+")
        suffix = arch[-1] if arch[-1] in "af" else ""
        arch_major, _, arch_minor = arch.rstrip("af").partition(".")
        if (int(arch_major), int(arch_minor or 0)) == (major, minor):
            return True
        if suffix == "f" and int(arch_major) == major and int(arch_minor or 0) <= minor:
            return True
        if ptx == "PTX" and not suffix and (int(arch_major), int(arch_minor or 0)) <= (major, minor):
            return True
    return False


@torch.compiler.assume_constant_result
def cuda_arch_error(device_index: int) -> Optional[str]:
    """Why the extension's kernels cannot run on this GPU (not compiled for its arch), or None."""
    key = f"arch:{device_index}"
    if key not in _status_cache:
        major, minor = torch.cuda.get_device_capability(device_index)
        arch_list = cuda_build_info().get("cuda_arch_list", "")
        _status_cache[key] = None if arch_list_runs_on(arch_list, major, minor) else (
            f"the CUDA extension was built for TORCH_CUDA_ARCH_LIST={arch_list!r}, not for this GPU "
            f"(sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}"
        )
    return _status_cache[key]


@torch.compiler.assume_constant_result
def triton_error() -> Optional[str]:
    if "triton" not in _status_cache:
        found = importlib.util.find_spec("triton") is not None
        _status_cache["triton"] = None if found else "triton is not installed"
    return _status_cache["triton"]


def unavailable_reason(backend: str, x: torch.Tensor) -> Optional[str]:
    """Why `backend` cannot compute a block on `x`, or None if it can."""
    _validated(backend, "backend")
    if backend in ("reference", "auto"):
        return None
    if backend == "cuda":
        if x.device.type == "cpu":
            why = cuda_emulation_error()
            why = why and f"x is on cpu; {why}"
        elif x.device.type != "cuda":
            why = f"x is on {x.device}; the cuda backend runs on CUDA tensors"
        else:
            why = cuda_extension_error() or cuda_arch_error(
                x.device.index if x.device.index is not None else torch.cuda.current_device())
        # Below this, every grid the CUDA kernels launch is within the GPU's limits: the
        # per-channel reduction launches up to N*C/8 blocks along x, whose limit is 2^31 - 1. A
        # symbolic size (torch.export with a dynamic batch) counts as below it unless provably not, so no
        # guard bounds the batch; past it the launch fails with CUDA's error.
        if why is None and statically_known_true(x.numel() >= CUDA_MAX_ELEMENTS):
            why = f"x has {x.numel()} elements; the cuda kernels' grids are sized for fewer than 2^34"
    else:
        why = triton_error()
        if why is None and x.device.type != "cuda" and not (x.device.type == "cpu" and triton_interpreted()):
            why = f"x is on {x.device}; the triton backend runs on CUDA tensors (CPU tensors with TRITON_INTERPRET=1)"
    if why:
        return why
    if x.dtype not in KERNEL_DTYPES:
        return f"x has dtype {x.dtype}; the kernels take float16, bfloat16, float32 and float64"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return (
            f"x is neither contiguous NCHW nor channels_last (strides {tuple(x.stride())}); "
            "the kernels read x where it lies rather than copy it"
        )
    return None


class Dispatch(NamedTuple):
    """The backend that computes a block on an input, and why each backend before it was passed over."""

    backend: str
    passed_over: Dict[str, str]
    emulated: bool = False  # the cuda backend on CPU tensors: the CUDA kernels under CPU emulation

    def __str__(self):
        chosen = f"{self.backend} (CUDA kernels under CPU emulation)" if self.emulated else self.backend
        lines = [f"backend: {chosen}"] + [f"  not {name}: {why}" for name, why in self.passed_over.items()]
        return "\n".join(lines)


def dispatch(x: torch.Tensor, block_reason: Optional[str] = None,
             kernels: Tuple[str, ...] = KERNEL_BACKENDS) -> Dispatch:
    """Pick the backend for `x` under the current setting.

    `block_reason`, when given, is why no kernel covers this block's configuration (an activation
    without a fused formula, a norm layer): every kernel backend is then passed over with it.
    `kernels` are the backends with a kernel for this block (the newer blocks have Triton's only).
    """
    requested = _backend
    if requested == "reference":
        return Dispatch("reference", {})
    if requested == "auto":
        candidates = KERNEL_BACKENDS
    else:
        candidates = (requested,) + tuple(b for b in KERNEL_BACKENDS if b != requested)
    passed_over = {}
    chosen = "reference"
    for backend in candidates:
        if backend not in kernels:
            why = f"this block has no {backend} kernel (it has: {', '.join(kernels)})"
        elif block_reason is not None:
            why = block_reason
        elif requested == "auto" and x.device.type != "cuda":
            why = f"x is on {x.device}; 'auto' sends non-CUDA tensors to the reference"
        else:
            why = unavailable_reason(backend, x)
        if why is None:
            chosen = backend
            break
        passed_over[backend] = why
    return Dispatch(chosen, passed_over, emulated=chosen == "cuda" and x.device.type == "cpu")
