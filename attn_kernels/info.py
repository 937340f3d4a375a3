"""`python -m attn_kernels.info`: versions, GPUs, the CUDA extension's build, and which backends
this machine can run (with the reason for each one it cannot)."""
import importlib.metadata
import platform

import torch

from . import __version__, backends

BUILD_HELP = """\
To build the CUDA extension: a CUDA build of torch and the CUDA toolkit (nvcc) of the same major
version, then, from the source tree:
    CUDA_HOME=/path/to/cuda MAX_JOBS=$(nproc) pip install --no-build-isolation -v -e .
Without a GPU on the build machine, name the target with TORCH_CUDA_ARCH_LIST (e.g. "9.0").
ATTN_KERNELS_BUILD_CUDA=1 makes a failed build an error instead of a pure-Python install."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"attn_kernels {__version__}",
        f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"
        f" | triton {_version('triton')} | timm {_version('timm')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        probe = torch.empty(1, 1, 1, 1, device="cuda")
    else:
        lines.append("GPU: none visible")
        probe = torch.empty(1, 1, 1, 1)

    why_not_built = backends.cuda_extension_error()
    if why_not_built is None:
        info = backends.cuda_build_info()
        lines.append(
            f"CUDA extension: built for TORCH_CUDA_ARCH_LIST={info.get('cuda_arch_list', '?')} "
            f"against torch {info.get('torch', '?')}, CUDA {info.get('cuda', '?')}"
        )
    else:
        lines.append(f"CUDA extension: not available: {why_not_built}")

    why_no_emulation = backends.cuda_emulation_error()
    lines.append("CUDA emulation: " + (
        "built (attn_kernels._emulated): the cuda backend runs the CUDA kernels on CPU tensors under an "
        "emulation of CUDA's execution model" if why_no_emulation is None else f"not built: {why_no_emulation}"))

    lines.append(f"backend setting: {backends.get_backend()!r} (set_backend, use_backend or ${backends.ENV_VAR})")
    lines.append(f"backends for a {probe.device.type.upper()} tensor here:")
    for name in backends.KERNEL_BACKENDS + ("reference",):
        why = backends.unavailable_reason(name, probe)
        lines.append(f"  {name:<10} {'usable' if why is None else 'no: ' + why}")
    if why_not_built is not None:
        lines += ["", BUILD_HELP]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
