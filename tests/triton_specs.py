"""pytest plugin: records the specialization of every Triton kernel launch the tests make.

Without a GPU the tests run the Triton kernels in Triton's interpreter, which compiles nothing: a
kernel that the interpreter runs may still fail to compile for a GPU. With ATTN_KERNELS_TRITON_SPECS
set to a file path, this plugin wraps the interpreter's launch and, for each launch, computes the
specialization that the compiled launcher would build for it (attn_kernels.kernel_report.specialization). Each unique record becomes a JSON line of that file;
`python -m attn_kernels.kernel_report --specs FILE` compiles them for real GPU targets.

Records are appended under an exclusive lock, so several processes (pytest-xdist workers) can share
one file. With the variable unset, or where the kernels run compiled (a GPU), it does nothing.
"""
import json
import os
import warnings

from attn_kernels.kernel_report import specialization

ENV = "ATTN_KERNELS_TRITON_SPECS"

_seen = set()          # unique records written by this process
_disabled = None       # the reason recording is off, once known


def _disable(reason):
    global _disabled
    if _disabled is None:
        _disabled = reason
        warnings.warn(f"{ENV}: Triton specializations are not recorded: {reason}", stacklevel=2)


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
