"""Launching a Triton kernel through its cached compiled launcher.

`kernel[grid](...)` runs `JITFunction.run` on every call: binding the arguments, computing their
specialization and the cache key, building launch metadata, about 15 us of host time in triton
3.7. `launch` does that once and afterwards calls the compiled kernel's launcher directly (a few
microseconds, as vLLM's CachedKernel does). Its cache key holds the scalar arguments' values, the
tensors' dtypes and 16-byte alignment, the constexprs, the warps and the device: finer than what
Triton specializes on (a tensor's dtype and alignment, whether an int is 1, divisible by 16 or
wider than 32 bits), so a hit always means the kernel Triton would pick.

Under Triton's interpreter (TRITON_INTERPRET=1, on CPU tensors) kernels are not compiled: `launch`
then calls `kernel[grid](...)`.
"""
from typing import Dict, Tuple

import triton
from triton import knobs
from triton.runtime import driver

_compiled: Dict[tuple, object] = {}


def _hooks():
    """(enter, exit) launch hooks to hand the launcher, None where none is registered: triton 3.7
    keeps an empty HookChain, with which JITFunction.run would still build launch metadata."""
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if enter is not None and not getattr(enter, "calls", True):
        enter = None
    if exit_ is not None and not getattr(exit_, "calls", True):
        exit_ = None
    return enter, exit_


def launch(kernel, grid: Tuple[int, ...], tensors: tuple, scalars: tuple, constexprs: dict, num_warps: int) -> None:
    """kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps) for a kernel whose
    parameters are its tensors, then its scalars, then its constexprs (in that order), through the
    cached compiled launcher after the first call. The caller holds the device guard."""
    if not isinstance(kernel, triton.runtime.jit.JITFunction):  # interpreted
        kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps)
        return
    first = tensors[0]
    device = first.device.index if first.is_cuda else driver.active.get_current_device()
    key = (id(kernel), device, num_warps, *constexprs.values(), *scalars,
           *[(t.dtype, t.data_ptr() & 15 == 0) for t in tensors])
    compiled = _compiled.get(key)
    if compiled is None:
        if kernel.arg_names[len(tensors) + len(scalars):] != list(constexprs):
            raise ValueError(f"launch(): {kernel.__name__} takes {kernel.arg_names} in that order; got "
                             f"{len(tensors)} tensors, {len(scalars)} scalars and constexprs {list(constexprs)}")
        _compiled[key] = kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps)
        return
    stream = driver.active.get_current_stream(device)
    values = (*tensors, *scalars, *constexprs.values())
    enter, exit_ = _hooks()
    metadata = compiled.launch_metadata(grid, stream, *values) if enter is not None else None
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                 compiled.function, compiled.packed_metadata, metadata, enter, exit_, *values)
