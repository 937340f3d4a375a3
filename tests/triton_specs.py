"""pytest plugin: records the specialization of every Triton kernel launch the tests make.

Without a GPU the tests run the Triton kernels in Triton's interpreter, which compiles nothing: a
kernel that the interpreter runs may still fail to compile for a GPU. With ATTN_KERNELS_TRITON_SPECS
set to a file path, this plugin wraps the interpreter's launch and, for each launch, computes the
specialization that the compiled launcher (triton.runtime.jit.JITFunction.run) would build for
it, with Triton's own code: the launcher's argument binder (create_function_from_signature, which
calls Triton's native specialize_impl: '*fp32'/'*bf16' pointers, i32/i64 integers, an integer
equal to 1 made a constant, divisibility by 16 of pointers and integers) and its _pack_args
(signature, constexprs, attributes, options). Each unique record becomes a JSON line of that file;
`python -m attn_kernels.kernel_report --specs FILE` compiles them for real GPU targets.

Records are appended under an exclusive lock, so several processes (pytest-xdist workers) can share
one file. With the variable unset, or where the kernels run compiled (a GPU), it does nothing.
"""
import json
import os
import warnings

ENV = "ATTN_KERNELS_TRITON_SPECS"

_seen = set()          # unique records written by this process
_jit_functions = {}    # python function -> the JITFunction the compiled launcher would use
_disabled = None       # the reason recording is off, once known


def _disable(reason):
    global _disabled
    if _disabled is None:
        _disabled = reason
        warnings.warn(f"{ENV}: Triton specializations are not recorded: {reason}", stacklevel=2)


def _backend():
    """The CUDA backend; its specialization rules (the base backend's) are those of every CUDA target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", 90, 32))


def encode_value(value):
    """A constexpr value as JSON (kernel_report.decode_value reverses it)."""
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
    """(record dict) for a launch `interpreted[grid](*args, **kwargs)` as the compiled launcher sees it."""
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


def _append(path, line):
    import fcntl

    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(line + "\n")
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _record(interpreted, args, kwargs):
    path = os.environ.get(ENV)
    if not path or _disabled is not None:
        return
    try:
        record = specialization(interpreted, args, kwargs)
    except (AttributeError, ImportError) as e:  # another Triton's internals
        import triton

        _disable(f"triton {triton.__version__}'s launcher internals differ from 3.6/3.7 ({type(e).__name__}: {e})")
        return
    except Exception as e:  # a launch the compiled launcher would refuse: kernel_report fails on it
        fn = interpreted.fn
        record = {"kernel": f"{fn.__module__}:{fn.__qualname__}", "error": f"{type(e).__name__}: {e}"}
    line = json.dumps(record, sort_keys=True)
    if line not in _seen:
        _seen.add(line)
        _append(path, line)


def install():
    """Wraps InterpretedFunction.run; returns False (and says why) where there is nothing to record."""
    from triton import knobs

    if not knobs.runtime.interpret:
        _disable("the kernels run compiled (TRITON_INTERPRET is not set), not in the interpreter")
        return False
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    if getattr(run, "_attn_specs", False):
        return True

    def recording_run(self, *args, grid, warmup, **kwargs):
        _record(self, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run._attn_specs = True
    InterpretedFunction.run = recording_run
    return True


def pytest_configure(config):
    if os.environ.get(ENV):
        install()


def pytest_terminal_summary(terminalreporter):
    path = os.environ.get(ENV)
    if not path:
        return
    if _disabled is not None:
        terminalreporter.write_line(f"{ENV}: nothing recorded: {_disabled}")
    elif os.path.exists(path):  # every process's records (pytest-xdist's workers write there too)
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        terminalreporter.write_line(f"{ENV}: {len(set(lines))} unique Triton specializations recorded in {path}")
