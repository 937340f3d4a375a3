"""Builds attn_kernels, with its CUDA extension (attn_kernels._C) when a CUDA toolchain is present.

Without nvcc, or with a CPU build of torch, the package installs without the extension and the
'triton' and 'reference' backends serve every input (`python -m attn_kernels.info` says why).
With ATTN_KERNELS_BUILD_EMULATION=1 it also builds attn_kernels._emulated: the same csrc/ sources
compiled as host C++ against csrc/emulation/cuda_emulation.h (no nvcc, no GPU, any torch build),
whose kernels run on CPU tensors under an emulation of CUDA's execution model. The tests use it;
users need not.
Environment:
  ATTN_KERNELS_BUILD_CUDA=0|1   skip the extension, or fail loudly when it cannot be built
  ATTN_KERNELS_BUILD_EMULATION=1  also build the CPU emulation of the CUDA kernels
  TORCH_CUDA_ARCH_LIST          GPU architectures to compile for, e.g. "8.0;9.0" (default: the
                                visible GPUs, else 9.0 = H100/H200)
  MAX_JOBS                      parallel compile jobs (default: all cores)
"""
import glob
import json
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def say(message):
    print(f"[attn_kernels] {message}", file=sys.stderr, flush=True)


def cuda_extension_or_reason():
    """Returns (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a printed reason."""
    wanted = os.environ.get("ATTN_KERNELS_BUILD_CUDA")
    if wanted == "0":
        say("ATTN_KERNELS_BUILD_CUDA=0: building without the CUDA extension.")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # torch is needed at build time: pip install --no-build-isolation
        reason = f"torch is not importable ({e}); install torch first and build with --no-build-isolation"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build; the extension needs a CUDA build of torch"
        elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
            reason = (f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME}); "
                      "set CUDA_HOME to the folder holding bin/nvcc and include/cuda_runtime.h")
        else:
            reason = None
    if reason:
        if wanted == "1":
            raise RuntimeError(f"attn_kernels: cannot build the CUDA extension: {reason}")
        say(f"building without the CUDA extension: {reason}.")
        return [], {}

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            say("no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling for 9.0 (H100/H200).")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # Read by `python -m attn_kernels.info` and by the 'cuda' backend's check of the GPU's arch.
    with open(os.path.join(ROOT, "attn_kernels", "_build_info.json"), "w") as f:
        json.dump({"cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"], "torch": torch.__version__,
                   "cuda": torch.version.cuda}, f)

    # The pip CUDA wheels (nvidia-*-cu13) carry headers that ATen's CUDA headers include
    # (cusparse.h, cublas_v2.h, ...) and that a compiler-only CUDA toolkit may lack.
    include_dirs, library_dirs = [], []
    try:
        import nvidia

        for base in nvidia.__path__:
            include_dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
            library_dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
    except ImportError:
        pass

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    say(
        f"building the CUDA extension ({len(sources)} files) for TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')} with {os.environ['MAX_JOBS']} jobs "
        f"(nvcc from {CUDA_HOME}); pip install -v shows each step."
    )
    extension = CUDAExtension(
        name="attn_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + include_dirs,
        library_dirs=library_dirs,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def emulation_extension():
    """attn_kernels._emulated: each csrc/ file compiled as C++ with AK_EMULATION, through a one-line
    wrapper (a .cu name would send it to nvcc), plus the emulation's runtime and self-test kernels."""
    from torch.utils.cpp_extension import CppExtension

    wrapper_dir = os.path.join(ROOT, "build", "emulation")
    os.makedirs(wrapper_dir, exist_ok=True)
    sources = sorted(glob.glob(os.path.join("csrc", "emulation", "*.cpp")))  # the runtime and its self-tests
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))):
        wrapper = os.path.join(wrapper_dir, os.path.basename(source) + ".cpp")
        text = f'#include "{os.path.basename(source)}"  // generated by setup.py: {os.path.basename(source)} as host C++\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(os.path.relpath(wrapper, ROOT))
    say(f"building the CUDA emulation attn_kernels._emulated ({len(sources)} files, host C++).")
    return CppExtension(
        name="attn_kernels._emulated",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("AK_EMULATION", None)],
        # No debug information, which would slow the build; #pragma unroll is for nvcc.
        extra_compile_args=["-O2", "-g0", "-Wno-unknown-pragmas"],
    )


ext_modules, cmdclass = cuda_extension_or_reason()
if os.environ.get("ATTN_KERNELS_BUILD_EMULATION") == "1":
    from torch.utils.cpp_extension import BuildExtension

    ext_modules.append(emulation_extension())
    cmdclass.setdefault("build_ext", BuildExtension.with_options(use_ninja=True))
setup(ext_modules=ext_modules, cmdclass=cmdclass)
