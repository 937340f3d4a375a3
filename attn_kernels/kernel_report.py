"""`python -m attn_kernels.kernel_report`: compiles the Triton kernels for real GPU targets, with no GPU.

Without a GPU the tests run the Triton kernels in Triton's interpreter, which compiles nothing. The
pytest plugin tests/triton_specs.py records, with ATTN_KERNELS_TRITON_SPECS=FILE, the
specialization of every launch as the compiled launcher would build it (pointer dtypes, i32/i64,
integers equal to 1 made constants, divisibility by 16, constexprs, num_warps). This command:

  * compiles the recorded specializations with triton.compile(ASTSource(...), target=GPUTarget(
    "cuda", 90, 32)) and GPUTarget("cuda", 80, 32) (no GPU or driver needed), in parallel processes;
    any failure makes it exit non-zero, naming the kernel and the specialization. Of specializations
    that differ only in their scalars' values (which ints are 1, which divisible by 16) one is
    compiled, the most specialized (one_per_scalar_values; --every-scalar-value: all of them);
  * reads registers per thread and spill stores/loads from Triton's own ptxas run (-v) on the PTX,
    and the shared memory a launch asks for from the compiled kernel's metadata. Identical PTX (two
    specializations whose difference the code never used) is assembled once, its cubin reused;
  * flags NaN-ignoring max/min ops in the TTIR (arith.maxnumf / arith.minnumf: tl.maximum and
    tl.max without propagate_nan=tl.PropagateNan.ALL, unlike torch.amax, drop NaN); a failure
    unless --allow-nan-ignoring;
  * with --cuda, compiles each csrc/*.cu with nvcc as setup.py's CUDAExtension would (torch's
    nvcc flags, include paths and defines), with -Xptxas -v for sm_90a and sm_80, and parses the
    same figures per kernel;
  * with --table FILE, writes one Markdown table of every kernel and target: the worst case over
    its specializations, and whether it meets the bar: no spills, and registers that let two blocks
    of the launched size share an SM (registers * threads * 2 <= 65536).

    python -m attn_kernels.kernel_report --specs specs.jsonl [--cuda] [--table benchmarks/kernel_resources.md]

TRITON_INTERPRET must not be set where the kernels compile (triton.jit then makes interpreted
functions): the compiling processes are started without it.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import glob
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TARGETS = (90, 80)
REGISTERS_PER_SM = 65536
NAN_IGNORING_OPS = ("arith.maxnumf", "arith.minnumf")


def sm_name(capability):
    return f"sm_{capability}{'a' if capability >= 90 else ''}"


# ---- recording and loading specializations ----------------------------------------------------

_jit_functions = {}  # python function -> the JITFunction the compiled launcher would use


def _backend():
    """The CUDA backend; its specialization rules (the base backend's) are those of every CUDA target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


def encode_value(value):
    """A constexpr value as JSON (decode_value reverses it)."""
    import triton.language as tl

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tl.constexpr):
        return encode_value(value.value)
    if isinstance(value, tl.dtype):
        return {"dtype": str(value)}
    fn = getattr(value, "fn", None)
    if callable(fn) and hasattr(fn, "__qualname__"):  # a JITFunction or InterpretedFunction passed as constexpr
        return {"jit_function": f"{fn.__module__}:{fn.__qualname__}"}
    raise TypeError(f"cannot record a constexpr of type {type(value).__name__}: {value!r}")


def _path_name(arg_names, path):
    return arg_names[path[0]] + "".join(f"[{i}]" for i in path[1:])


def specialization(interpreted, args, kwargs):
    """The record (a JSON-able dict) of an interpreted launch `interpreted[grid](*args, **kwargs)`:
    the specialization that the compiled launcher (triton.runtime.jit.JITFunction.run) would build
    for it, with Triton's own code: the launcher's argument binder (create_function_from_signature,
    which calls Triton's native specialize_impl: '*fp32'/'*bf16' pointers, i32/i64 integers, an
    integer equal to 1 made a constant, divisibility by 16 of pointers and integers) and its
    _pack_args (signature, constexprs, attributes, options). compile_one compiles it."""
    from triton.runtime import jit

    fn = interpreted.fn
    jf = _jit_functions.get(fn)
    if jf is None:
        # The JITFunction that @triton.jit would have made without TRITON_INTERPRET, with the same
        # do_not_specialize / do_not_specialize_on_alignment options.
        jf = jit.JITFunction(fn, **interpreted.kwargs)
        backend = _backend()
        jf._attn_binder = (backend, jit.create_function_from_signature(jf.signature, jf.params, backend))
        _jit_functions[fn] = jf
    backend, binder = jf._attn_binder
    bound_args, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, dict(kwargs), bound_args, spec, options)
    names = jf.arg_names
    launch_options = {k: v for k, v in kwargs.items() if k not in names}
    launch_options["num_warps"] = options.num_warps
    return {
        "kernel": f"{fn.__module__}:{fn.__qualname__}",
        "signature": signature,
        "constexprs": {_path_name(names, path): encode_value(v) for path, v in sorted(constexprs.items())},
        "attrs": {_path_name(names, path): v for path, v in sorted(attrs.items()) if v},
        "options": dict(sorted(launch_options.items())),
    }


def _declared_constexprs(kernel: str) -> set:
    """The parameters a kernel declares tl.constexpr (the others are tensors and scalars, which the
    launcher may still turn into constants: an int equal to 1)."""
    import inspect

    fn = resolve(kernel)
    python = getattr(fn, "fn", fn)  # a JITFunction's (or an interpreted function's) Python function
    return {name for name, p in inspect.signature(python).parameters.items() if "constexpr" in str(p.annotation)}


def one_per_scalar_values(specs):
    """The specs, one kept of each group that differ only in the values of their scalar arguments:
    which ints are 1 (made constants) and which are divisible by 16. Those values change the
    constants the compiler folds, not the code a kernel's constexprs, dtypes and warps select, and
    they multiply the specializations the tests record by the shapes they use. Kept: the one with
    the most specialized scalars (the most constant folding), or the first in order."""
    declared, groups = {}, {}
    for spec in specs:
        kernel = spec["kernel"]
        if kernel not in declared:
            declared[kernel] = _declared_constexprs(kernel)
        real = declared[kernel]
        scalars = {name for name, ty in spec["signature"].items()
                   if name not in real and not ty.startswith("*")}
        key = json.dumps([kernel, spec.get("options"),
                          {k: v for k, v in spec["constexprs"].items() if k not in scalars},
                          {k: v for k, v in spec["signature"].items() if k not in scalars},
                          {k: v for k, v in spec.get("attrs", {}).items() if k not in scalars}], sort_keys=True)
        facts = sum(k in scalars for k in spec["constexprs"]) + sum(k in scalars for k in spec.get("attrs", {}))
        if key not in groups or facts > groups[key][0]:
            groups[key] = (facts, spec)
    kept = {id(spec) for _, spec in groups.values()}
    return [spec for spec in specs if id(spec) in kept]


def load_specs(paths):
    """(unique specs, lines read) from JSON-lines files (or folders of *.jsonl), in a stable order."""
    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.jsonl"))) if os.path.isdir(path) else [path]
    unique, lines = {}, 0
    for name in files:
        with open(name, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines += 1
                    spec = json.loads(line)
                    unique.setdefault(json.dumps(spec, sort_keys=True), spec)
    specs = [unique[key] for key in sorted(unique)]
    return sorted(specs, key=lambda s: s["kernel"]), lines


def spec_label(spec):
    """A one-line name of a specialization, for messages."""
    if "signature" not in spec:
        return f"{spec['kernel']} (a launch the recorder could not specialize)"
    sig = ", ".join(f"{k}:{v}" for k, v in spec["signature"].items() if v != "constexpr")
    const = ", ".join(f"{k}={v}" for k, v in spec["constexprs"].items())
    aligned = ",".join(spec.get("attrs", {}))
    opts = ", ".join(f"{k}={v}" for k, v in spec.get("options", {}).items())
    return f"{spec['kernel']}[{opts}]({sig}; {const}; divisible by 16: {aligned or '-'})"


def resolve(name):
    """The object `module:qualname` names."""
    module, _, qualname = name.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def decode_value(value):
    import triton.language as tl

    if isinstance(value, dict):
        if "dtype" in value:
            return tl.dtype(value["dtype"])
        if "jit_function" in value:
            return resolve(value["jit_function"])
        raise ValueError(f"unknown recorded constexpr {value!r}")
    return value


def _path(arg_names, name):
    """'x' -> (index of x,), 'x[1][0]' -> (index of x, 1, 0): the launcher's argument paths."""
    base, *rest = name.split("[")
    return (arg_names.index(base), *(int(i.rstrip("]")) for i in rest))


def ast_source(spec):
    """The ASTSource the compiled launcher would build for a recorded launch."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = resolve(spec["kernel"])
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{spec['kernel']} is a {type(fn).__name__}, not a JITFunction (is TRITON_INTERPRET set?)")
    names = fn.arg_names
    signature = {name: spec["signature"][name] for name in names if name in spec["signature"]}
    constexprs = {_path(names, k): decode_value(v) for k, v in spec["constexprs"].items()}
    attrs = {_path(names, k): [list(a) for a in v] for k, v in spec.get("attrs", {}).items()}
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


# ---- ptxas output ------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log):
    """{(function, arch): {registers, stack, spill_stores, spill_loads, smem}} from `ptxas -v` output."""
    out, current, props = {}, None, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = (m.group(1), m.group(2))
            out.setdefault(current, {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0})
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _SPILL.search(line)) and current and props == current[0]:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and current:
            out[current].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return out


# ---- the compiling processes -------------------------------------------------------------------

_ptxas_logs = {}  # this process: PTX hash -> the ptxas log of the cubin just made


def _ptx_key(src, arch, opt):
    flags = f"{arch}|{getattr(opt, 'enable_fp_fusion', True)}|{getattr(opt, 'ptx_options', None)}"
    return hashlib.sha256((flags + "\n" + src).encode()).hexdigest()


def _worker_init(share_dir):
    """Wraps the CUDA backend's cubin stage: Triton's own ptxas run, with its -v log kept, done once
    per distinct PTX across the processes (share_dir holds the cubins and logs made so far)."""
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set in a compiling process")
    make_cubin = CUDABackend.make_cubin

    def cached_make_cubin(self, src, metadata, opt, capability):
        key = _ptx_key(src, self.target.arch, opt)
        cubin_path, log_path = os.path.join(share_dir, key + ".cubin"), os.path.join(share_dir, key + ".log")
        if os.path.exists(log_path):
            with open(cubin_path, "rb") as f, open(log_path, encoding="utf-8") as g:
                _ptxas_logs[key] = ("reused", g.read())
                return f.read()
        log = io.StringIO()
        previous = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas log: take it
        try:
            with contextlib.redirect_stdout(log):
                cubin = make_cubin(self, src, metadata, opt, capability)
        finally:
            knobs.nvidia.dump_ptxas_log = previous
        text = log.getvalue()
        if "Used" not in text:  # this Triton keeps no log: run the same ptxas for it
            text = _run_ptxas(src, self.target.arch)
        _ptxas_logs[key] = ("assembled", text)
        for path, data, mode in ((cubin_path, cubin, "wb"), (log_path, text, "w")):
            with open(path + f".{os.getpid()}", mode) as f:
                f.write(data)
            os.replace(path + f".{os.getpid()}", path)  # the log last: its presence means both are there
        return cubin

    CUDABackend.make_cubin = cached_make_cubin


def ptxas_path(capability):
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(capability).path


def _run_ptxas(ptx, capability):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas_path(capability), f"-arch={sm_name(capability)}", "-v", path, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        return done.stdout + done.stderr


def nan_ignoring_ops(ttir):
    """[(op, 'file:line')] of each NaN-ignoring max/min op in a TTIR module."""
    locs = dict(re.findall(r'^#(loc\d*) = loc\("([^"]+":\d+)', ttir, re.M))
    found = []
    for line in ttir.splitlines():
        for op in NAN_IGNORING_OPS:
            if f" {op} " in line:
                m = re.search(r"loc\(#(loc\d*)\)", line)
                where = locs.get(m.group(1), "?").replace('"', "") if m else "?"
                found.append((op, os.path.basename(where.split(":")[0]) + ":" + where.split(":")[-1]))
    return found


def compile_one(spec, capability):
    """Compiles one specialization for one target; a result dict (error set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = {"kernel": spec["kernel"], "spec": spec, "target": sm_name(capability), "error": None}
    start = time.perf_counter()
    try:
        if "error" in spec:
            raise RuntimeError(f"the compiled launcher would refuse this launch: {spec['error']}")
        src = ast_source(spec)
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(spec.get("options", {})))
        ptx = kernel.asm["ptx"]
        key = _ptx_key(ptx, capability, kernel.metadata)
        how, log = _ptxas_logs.get(key, ("cached", None))
        if log is None:  # Triton's cache answered: assemble again for the figures
            log = _run_ptxas(ptx, capability)
        usage = parse_ptxas(log)
        entry = usage.get((kernel.metadata.name, sm_name(capability)))
        if entry is None:
            raise RuntimeError(f"no ptxas figures for {kernel.metadata.name} in:\n{log}")
        result.update(entry, shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps, ptxas=how,
                      nan_ops=nan_ignoring_ops(kernel.asm["ttir"]),
                      declared_constexprs=[p.name for p in src.fn.params if p.is_constexpr])
        for path in {os.path.dirname(p) for p in kernel.metadata_group.values()}:  # read: the cache's
            shutil.rmtree(path, ignore_errors=True)                               # files are done with
    except Exception as e:  # reported with the kernel and its specialization
        result["error"] = f"{type(e).__name__}: {e}"
    result["seconds"] = time.perf_counter() - start
    return result


def compile_all(specs, targets, jobs, progress=None):
    """Compiles every (spec, target) in `jobs` processes started without TRITON_INTERPRET (in this
    process for jobs=1 where TRITON_INTERPRET was never set: its kernels are JITFunctions)."""
    in_process = jobs == 1 and not os.environ.get("TRITON_INTERPRET")
    work = [(spec, cap) for spec in specs for cap in targets]  # grouped by kernel: identical PTX is likelier
    saved = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_INTERPRET", "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    # Triton writes each stage's IR to its cache and ptxas's files to TMPDIR: on a RAM-backed folder
    # where there is one, which saves about a tenth of the time.
    ram = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    if ram and shutil.disk_usage(ram).free < 1 << 30:
        ram = None
    with tempfile.TemporaryDirectory(prefix="attn_kernels_compile_", dir=ram) as tmp:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")  # fresh: no cache hit skips ptxas
        os.environ["TMPDIR"] = tempfile.tempdir = os.path.join(tmp, "tmp")
        os.environ.pop("TRITON_INTERPRET", None)
        share = os.path.join(tmp, "ptxas")
        os.makedirs(share)
        os.makedirs(os.environ["TMPDIR"])
        results = []
        try:
            if in_process:
                from triton.backends.nvidia.compiler import CUDABackend

                make_cubin = CUDABackend.make_cubin
                _worker_init(share)
                try:
                    for spec, cap in work:
                        results.append(compile_one(spec, cap))
                        if progress:
                            progress(len(results), len(work), results[-1])
                finally:
                    CUDABackend.make_cubin = make_cubin
            else:
                context = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                            initargs=(share,)) as pool:
                    for result in pool.map(compile_one, *zip(*work)) if work else ():
                        results.append(result)
                        if progress:
                            progress(len(results), len(work), results[-1])
        finally:
            tempfile.tempdir = saved_tempdir
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return results


# ---- the CUDA extension's kernels --------------------------------------------------------------

def cuda_home():
    """The CUDA toolkit: CUDA_HOME, else the one the nvcc on PATH belongs to, else /usr/local/cuda (as
    scripts/test.sh finds it: nvcc on PATH may be a wrapper outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc")))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _torch_cxx_std(cpp_extension):
    """The -std= that torch's BuildExtension gives nvcc (c++17 in older torch, c++20 since 2.9)."""
    with open(cpp_extension.__file__, encoding="utf-8") as f:
        found = re.findall(r"c\+\+(\d\d)'", f.read())
    return f"-std=c++{max(found, default='17')}"


def nvcc_command(source, capabilities, home):
    """nvcc as setup.py's CUDAExtension builds `source` (torch's flags, includes, defines), for the
    device side only (-fatbin) with the resource usage of each kernel (-Xptxas -v)."""
    import torch
    from torch.utils import cpp_extension

    try:
        torch_includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6
        torch_includes = cpp_extension.include_paths(cuda=True)
    includes = [os.path.dirname(os.path.abspath(source))]  # csrc/, as setup.py's include_dirs
    try:
        import nvidia

        for base in nvidia.__path__:
            includes += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    includes += torch_includes + [os.path.join(home, "include"), sysconfig.get_paths()["include"]]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    gencode = [f"-gencode=arch=compute_{sm_name(c)[3:]},code={sm_name(c)}" for c in capabilities]
    return [os.path.join(home, "bin", "nvcc"), *[f"-I{i}" for i in dict.fromkeys(includes)],
            *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", "-O3", "-lineinfo",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            _torch_cxx_std(cpp_extension), *gencode, "-Xptxas", "-v", "-fatbin", source, "-o", os.devnull]


def demangle(names):
    try:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return dict(zip(names, done.stdout.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


_SHORT_TYPES = [("c10::BFloat16", "bf16"), ("c10::Half", "fp16"), ("double", "fp64"), ("float", "fp32"),
                ("(anonymous namespace)::", ""), ("attn_kernels::", ""), ("(Reduce)", "")]


def short_name(demangled):
    """'void attn_kernels::(anonymous namespace)::k<float, 4, true>(float const*, ...)' -> 'k<fp32, 4, true>'."""
    name = re.sub(r"^void\s+", "", demangled)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    for long, short in _SHORT_TYPES:
        name = name.replace(long, short)
    return name


def cuda_kernels(capabilities, block_threads, csrc=None, jobs=2):
    """One result per (CUDA kernel instantiation, target) of csrc/*.cu; raises on a failed compile."""
    home = cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit (bin/nvcc, include/cuda_runtime.h): set CUDA_HOME")
    os.environ.setdefault("CUDA_HOME", home)  # torch.utils.cpp_extension's, where not imported yet
    sources = sorted(glob.glob(os.path.join(csrc or os.path.join(ROOT, "csrc"), "*.cu")))
    if not sources:
        raise RuntimeError(f"no .cu files in {csrc}")

    def run(source):
        start = time.perf_counter()
        done = subprocess.run(nvcc_command(source, capabilities, home), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed on {os.path.basename(source)}:\n{done.stderr[-4000:]}")
        return source, parse_ptxas(done.stdout + done.stderr), time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        compiled = list(pool.map(run, sources))
    names = demangle(sorted({fn for _, usage, _ in compiled for fn, _ in usage}))
    results = []
    for source, usage, seconds in compiled:
        for (fn, arch), entry in sorted(usage.items()):
            short = short_name(names.get(fn, fn))
            base, _, targs = short.partition("<")
            results.append({"kernel": f"{os.path.basename(source)}:{base}", "instance": short, "target": arch,
                            "threads": block_threads, "shared": entry["smem"], "error": None, "seconds": seconds,
                            **entry})
    return results


# ---- the table ---------------------------------------------------------------------------------

def threads_of(result):
    return result.get("threads") or result["num_warps"] * 32


def spill_bytes(result):
    return result["spill_stores"] + result["spill_loads"]


def meets_bar(result):
    return spill_bytes(result) == 0 and result["registers"] * threads_of(result) * 2 <= REGISTERS_PER_SM


def _values(values):
    values = {json.dumps(v) if isinstance(v, (dict, list)) else v for v in values}
    values = sorted(values, key=lambda v: (type(v).__name__, v if isinstance(v, (int, float)) else str(v)))
    if len(values) > 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return f"{values[0]}..{values[-1]} ({len(values)})"
    return "/".join(str(v) for v in values)


def triton_summary(results):
    """'bf16+fp32, fp32; BLOCK_C=4..128 (5); HAS_GATE=False/True': pointer dtypes, declared constexprs."""
    dtypes = sorted({"+".join(sorted({t[1:] for t in r["spec"]["signature"].values() if t.startswith("*")}))
                     for r in results})
    consts = collections.defaultdict(list)
    for r in results:
        for k, v in r["spec"]["constexprs"].items():
            if k in r.get("declared_constexprs", ()):
                consts[k].append(v)
    parts = [", ".join(dtypes)] + [f"{k}={_values(v)}" for k, v in sorted(consts.items())]
    return "; ".join(p for p in parts if p)


def _template_args(instance):
    """'k<fp32, 4, true>' -> ['fp32', '4', 'true'] (top-level template arguments)."""
    inner = instance.partition("<")[2][:-1]
    args, depth, current = [], 0, ""
    for ch in inner:
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
    return args + [current.strip()] if current.strip() else args


def cuda_summary(instances):
    """'k<bf16/fp16/fp32/fp64, fp32/fp64, false/true>': the values of each template argument."""
    columns = collections.defaultdict(set)
    for instance in instances:
        for i, arg in enumerate(_template_args(instance)):
            columns[i].add(arg)
    if not columns:
        return "-"
    return "<" + ", ".join("/".join(sorted(columns[i])) for i in sorted(columns)) + ">"


def worst_label(result):
    if "instance" in result:
        return result["instance"]
    s = result["spec"]
    dtypes = "+".join(sorted({t[1:] for t in s["signature"].values() if t.startswith("*")}))
    consts = ", ".join(f"{k}={v}" for k, v in s["constexprs"].items() if k in result.get("declared_constexprs", ()))
    return f"{dtypes} {consts}".strip()


def table(results):
    """Markdown: per kernel and target, the worst case over its specializations."""
    groups = collections.defaultdict(list)
    for r in results:
        if r["error"] is None:
            groups[(("CUDA" if "instance" in r else "Triton"), r["kernel"], r["target"])].append(r)
    lines = [
        "| kind | kernel | specializations | target | threads | registers/thread (max) | spill bytes (max) "
        "| shared memory (max) | meets bar | worst case |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, kernel, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "Triton", kv[0][1],
                                                                               kv[0][2] != "sm_90a")):
        worst = max(rs, key=lambda r: (spill_bytes(r), r["registers"] * threads_of(r)))
        failing = [r for r in rs if not meets_bar(r)]
        if kind == "Triton":
            summary = triton_summary(rs)
        else:
            summary = cuda_summary([r["instance"] for r in rs])
        threads = _values([threads_of(r) for r in rs])
        bar = "yes" if not failing else f"**no** ({len(failing)}/{len(rs)})"
        module, _, name = kernel.partition(":")
        module = module.rsplit(".", 1)[-1] if kind == "Triton" else module  # the Triton module, the .cu file
        lines.append(
            f"| {kind} | `{module}:{name}` | {len(rs)}: {summary} | {target} | {threads} "
            f"| {max(r['registers'] for r in rs)} | {max(spill_bytes(r) for r in rs)} "
            f"| {max(r['shared'] for r in rs)} | {bar} | {worst_label(worst)}: {worst['registers']} regs, "
            f"{spill_bytes(worst)} B spilled |")
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m attn_kernels.kernel_report",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="*", default=[], help="JSON-lines files (or folders of them) that "
                   "tests/triton_specs.py recorded with ATTN_KERNELS_TRITON_SPECS")
    p.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                   help="compute capabilities to compile for (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: %(default)s)")
    p.add_argument("--every-scalar-value", action="store_true",
                   help="compile every recorded specialization, also those that differ only in which scalar "
                        "arguments are 1 or divisible by 16 (default: one of each such group)")
    p.add_argument("--allow-nan-ignoring", action="store_true",
                   help="report NaN-ignoring max/min ops (arith.maxnumf/minnumf) without failing")
    p.add_argument("--cuda", action="store_true", help="also compile csrc/*.cu with nvcc and report their kernels")
    p.add_argument("--cuda-threads", type=int, default=256,
                   help="threads per block of the CUDA kernels' launches (csrc launches 256: kThreads, "
                        "kElementwiseThreads, kWarpsPerBlock*32, kTileC*kTileHW)")
    p.add_argument("--csrc", help="the folder of the .cu files to compile (default: the package's csrc/)")
    p.add_argument("--table", help="write the Markdown resource table to this file")
    p.add_argument("--results", help="render the table and summary from an earlier run's --json instead of "
                   "compiling")
    p.add_argument("--note", help="a line on where the recorded launches come from, for the table")
    p.add_argument("--json", help="write every result (one per specialization and target) to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    targets = [int(t.strip().removeprefix("sm_").rstrip("a")) for t in args.targets.split(",") if t.strip()]
    specs, lines = load_specs(args.specs)
    recorded = len(specs)
    if not args.every_scalar_value:
        specs = one_per_scalar_values(specs)
    if not specs and not args.cuda:
        print("kernel_report: no recorded specializations (record them with ATTN_KERNELS_TRITON_SPECS=FILE pytest)")
        return 2
    start = time.perf_counter()
    results = []
    if args.results:  # an earlier run's --json: the table again, without compiling
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
    elif specs:
        import triton

        print(f"kernel_report: {lines} recorded launches, {recorded} unique specializations of "
              f"{len({s['kernel'] for s in specs})} Triton kernels"
              + (f", {len(specs)} once the scalars' values are set aside (--every-scalar-value: all)"
                 if len(specs) < recorded else "") + "; compiling for "
              f"{', '.join(map(sm_name, targets))} with triton {triton.__version__} in {args.jobs} processes",
              flush=True)
        results = compile_all(specs, targets, args.jobs)
        ok = [r for r in results if r["error"] is None]
        seconds = time.perf_counter() - start
        assembled = sum(r.get("ptxas") == "assembled" for r in ok)
        print(f"kernel_report: {len(results)} compiles in {seconds:.1f} s wall ({len(ok)} ok; "
              f"{sum(r['seconds'] for r in results) / max(1, len(results)):.2f} s each in a process; "
              f"ptxas ran on {assembled} distinct PTX, reused for {len(ok) - assembled})", flush=True)
    cuda_error = None
    if args.cuda and not args.results:
        cuda_start = time.perf_counter()
        try:
            cuda = cuda_kernels(targets, args.cuda_threads, args.csrc, jobs=args.jobs)
            results += cuda
            print(f"kernel_report: nvcc: {len(cuda)} CUDA kernel instantiations x targets in "
                  f"{time.perf_counter() - cuda_start:.1f} s", flush=True)
        except RuntimeError as e:
            cuda_error = str(e)

    failures = [r for r in results if r["error"]]
    nan = [r for r in results if r["error"] is None and r.get("nan_ops")]
    over = [r for r in results if r["error"] is None and not meets_bar(r)]
    findings = []
    for r in failures:
        print(f"COMPILE FAILED for {r['target']}: {spec_label(r['spec'])}\n    {r['error'].strip()[:2000]}")
        findings.append(f"compile failed for {r['target']}: `{spec_label(r['spec'])}`")
    if cuda_error:
        print(f"COMPILE FAILED: {cuda_error}")
        findings.append(f"nvcc failed: {cuda_error.splitlines()[0]}")
    by_kernel = collections.defaultdict(set)
    for r in nan:
        by_kernel[r["kernel"]].update(f"{op} at {where}" for op, where in r["nan_ops"])
    for kernel, ops in sorted(by_kernel.items()):
        count = len({json.dumps(r["spec"], sort_keys=True) for r in nan if r["kernel"] == kernel})
        findings.append(f"NaN-ignoring max/min in `{kernel}` ({count} specializations): {'; '.join(sorted(ops))}")
        print(f"NaN-IGNORING max/min in {kernel} ({count} specializations): {'; '.join(sorted(ops))}")
    for (kernel, target), rs in sorted(_group(over, lambda r: (r["kernel"], r["target"])).items()):
        worst = max(rs, key=lambda r: (spill_bytes(r), r["registers"]))
        total = sum(1 for r in results if r["error"] is None and (r["kernel"], r["target"]) == (kernel, target))
        line = (f"over the bar: `{kernel}` on {target}: {len(rs)} of {total} specializations "
                f"(worst {worst_label(worst)}: {worst['registers']} registers, {spill_bytes(worst)} B spilled)")
        findings.append(line)
        print(line.replace("`", ""))
    triton_ok = [r for r in results if r["error"] is None and "spec" in r]
    cuda_ok = [r for r in results if r["error"] is None and "instance" in r]
    summary = (f"{len(triton_ok)} Triton compiles ({len({json.dumps(r['spec'], sort_keys=True) for r in triton_ok})} "
               f"specializations x {len({r['target'] for r in triton_ok})} targets) and {len(cuda_ok)} CUDA kernel "
               f"instantiations x targets built; {len(failures) + bool(cuda_error)} failed. NaN-ignoring max/min "
               f"(arith.maxnumf/minnumf) in the Triton kernels' TTIR: "
               f"{'in ' + str(len(by_kernel)) + ' kernels' if by_kernel else 'none'}.")
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(TABLE_HEADER + provenance(args, specs, lines) + "\n\n" + table(results) + "\n\n## Findings\n\n"
                    + summary + "\n\n" + "".join(f"- {line}\n" for line in findings))
        print(f"kernel_report: table written to {args.table}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    status = 0
    if failures or cuda_error:
        status = 1
    if by_kernel and not args.allow_nan_ignoring:
        print("kernel_report: NaN-ignoring max/min ops found (use tl.PropagateNan.ALL, or --allow-nan-ignoring)")
        status = 1
    print(f"kernel_report: {'FAILED' if status else 'ok'} in {time.perf_counter() - start:.1f} s")
    return status


def _group(items, key):
    groups = collections.defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def provenance(args, specs, lines):
    """Which tools and which recorded launches the table comes from."""
    parts = []
    if specs:
        import triton
        from triton.backends.nvidia.compiler import get_ptxas_version

        version = get_ptxas_version(DEFAULT_TARGETS[0])
        ptxas = (re.findall(r"release [\d.]+, V[\d.]+", version) or [version.strip()])[0]
        parts.append(f"Triton {triton.__version__} (its ptxas: {ptxas}); {len(specs)} unique specializations of "
                     f"{lines} recorded launches" + (f" ({args.note})" if args.note else ""))
    if args.cuda and cuda_home():
        version = subprocess.run([os.path.join(cuda_home(), "bin", "nvcc"), "--version"], capture_output=True,
                                 text=True).stdout.strip().splitlines()
        found = re.findall(r"release [\d.]+, V[\d.]+", "\n".join(version))
        parts.append(f"nvcc {found[0] if found else '?'}; CUDA blocks of {args.cuda_threads} threads")
    return "Made by `python -m attn_kernels.kernel_report` with " + "; ".join(parts) + "."


TABLE_HEADER = """\
# Kernel resources

Registers, spills and shared memory of every kernel, from `python -m attn_kernels.kernel_report`:
the Triton kernels at every specialization the tests launch (recorded by tests/triton_specs.py,
compiled by Triton for each target), the CUDA kernels of csrc/ at every template instantiation
(nvcc -Xptxas -v, the flags of setup.py). Per kernel and target, the worst case over its
specializations (their count, the values of their dtypes and constexprs). Bar: no spills, and
registers * threads * 2 <= 65536 (two blocks of the launched size fit an SM's register file).
Shared memory: Triton's dynamic shared memory per launch; for CUDA, ptxas's static shared memory
(the pixel-tile kernels of attention_pool.cu and scse.cu also take a dynamic tile at launch, not
counted here).
The specializations are those of the tests' shapes, which are small: real model widths may not be
among them. The ledger (python -m attn_kernels.ledger) compiles every launch at ResNet-50's shapes
for sm_90a: benchmarks/results/occupancy.csv has their registers and spills.

"""

if __name__ == "__main__":
    sys.exit(main())
