"""The Triton compile check: the launch recorder (tests/triton_specs.py) and the compiler
(attn_kernels.kernel_report), on tiny kernels of their own."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import mangle_type

import triton_specs
from attn_kernels import kernel_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIVISIBLE = [["tt.divisibility", 16]]


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, one, big, odd, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    v = tl.load(x_ptr + i * one, mask=mask, other=0)
    tl.store(y_ptr + i, v * scale + (big + odd).to(tl.float32), mask=mask)


interpreted = pytest.mark.skipif(not knobs.runtime.interpret, reason="records interpreted launches only")


@interpreted
def test_recorded_specialization_is_the_launchers(tmp_path, monkeypatch):
    x = torch.zeros(64)
    y = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
    args = (x, y, 48, 1, 2**33, 17, 0.5)
    path = tmp_path / "specs.jsonl"
    monkeypatch.setenv(triton_specs.ENV, str(path))
    monkeypatch.setattr(triton_specs, "_seen", set())
    assert triton_specs.install()
    _scale_kernel[(4,)](*args, BLOCK=16, num_warps=2)
    _scale_kernel[(4,)](*args, BLOCK=16, num_warps=2)  # the same specialization: one record
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [{
        "kernel": f"{__name__}:_scale_kernel",
        # The types Triton's launcher gives each argument (mangle_type is its specialize_impl).
        "signature": {"x_ptr": mangle_type(x), "y_ptr": mangle_type(y), "n": mangle_type(48), "one": "constexpr",
                      "big": mangle_type(2**33), "odd": mangle_type(17), "scale": "fp32", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": 16, "one": 1},  # an integer equal to 1 is specialized away
        "attrs": {"x_ptr": DIVISIBLE, "n": DIVISIBLE, "big": DIVISIBLE},  # not y_ptr, not odd
        "options": {"num_warps": 2},
    }]
    assert [mangle_type(a) for a in (x, 48, 2**33, 17)] == ["*fp32", "i32", "i64", "i32"]


KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def plain_max(x_ptr, out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr, tl.max(tl.load(x_ptr + tl.arange(0, BLOCK)), axis=0))


@triton.jit
def nan_max(x_ptr, out_ptr, BLOCK: tl.constexpr):
    v = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(out_ptr, tl.reduce(v, 0, _combine))


@triton.jit
def _combine(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def broken(x_ptr, out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.load(x_ptr + tl.arange(0, 3)))  # 3: not a power of 2
'''


def _spec(name):
    return {"kernel": f"tiny_kernels:{name}", "signature": {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": 64}, "attrs": {"x_ptr": DIVISIBLE, "out_ptr": DIVISIBLE},
            "options": {"num_warps": 1}}


def test_compiles_reports_failures_and_nan_ignoring_max(tmp_path):
    (tmp_path / "tiny_kernels.py").write_text(textwrap.dedent(KERNELS))
    specs = tmp_path / "specs.jsonl"
    specs.write_text("".join(json.dumps(_spec(name)) + "\n" for name in ("plain_max", "nan_max", "broken")))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    out = tmp_path / "results.json"
    # The command's module loaded from its file: `-m attn_kernels.kernel_report` would import the
    # package, torch with it, for nothing here. One process (--jobs 1), one target: a few seconds.
    run_main = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('kernel_report', sys.argv[1]); "
                "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main(sys.argv[2:]))")
    done = subprocess.run(
        [sys.executable, "-c", run_main, kernel_report.__file__, "--specs", str(specs), "--targets", "90",
         "--jobs", "1", "--json", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    results = {r["kernel"].split(":")[1]: r for r in json.loads(out.read_text())}
    assert "tiny_kernels:broken" in done.stdout and "COMPILE FAILED for sm_90a" in done.stdout, done.stdout
    assert results["broken"]["error"]
    assert "NaN-IGNORING max/min in tiny_kernels:plain_max" in done.stdout, done.stdout
    assert results["plain_max"]["nan_ops"] and results["plain_max"]["nan_ops"][0][0] == "arith.maxnumf"
    assert results["nan_max"]["error"] is None and not results["nan_max"]["nan_ops"]
    for name in ("plain_max", "nan_max"):
        assert results[name]["registers"] > 0 and results[name]["spill_stores"] == 0
        assert results[name]["target"] == "sm_90a" and results[name]["num_warps"] == 1


def test_parse_ptxas_and_names():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'
        ptxas info    : Function properties for _Z1kPf
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 168 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
        """)
    assert kernel_report.parse_ptxas(log) == {("_Z1kPf", "sm_90a"): {
        "registers": 168, "stack": 8, "spill_stores": 4, "spill_loads": 12, "smem": 2048}}
    demangled = ("void attn_kernels::(anonymous namespace)::gate_apply_kernel<c10::BFloat16, float, 8, true, false>"
                 "(c10::BFloat16 const*, float const*, long)")
    assert kernel_report.short_name(demangled) == "gate_apply_kernel<bf16, fp32, 8, true, false>"
    over = {"registers": 129, "num_warps": 8, "spill_stores": 0, "spill_loads": 0}
    assert not kernel_report.meets_bar(over) and kernel_report.meets_bar(dict(over, registers=128))


def test_one_specialization_is_compiled_per_group_of_scalar_values():
    """Specializations that differ only in which scalars are 1 (made constants) or divisible by 16
    compile once, the most specialized kept; a different constexpr, dtype or pointer alignment is
    its own group."""
    name = f"{__name__}:_scale_kernel"
    base = {"kernel": name, "options": {"num_warps": 4},
            "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "one": "i32", "big": "i64", "odd": "i32",
                          "scale": "fp32", "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": 64}, "attrs": {"x_ptr": DIVISIBLE, "y_ptr": DIVISIBLE}}
    n_divisible = json.loads(json.dumps(base))
    n_divisible["attrs"]["n"] = DIVISIBLE
    one_is_1 = json.loads(json.dumps(n_divisible))
    one_is_1["signature"]["one"] = "constexpr"
    one_is_1["constexprs"]["one"] = 1
    other_block = json.loads(json.dumps(base))
    other_block["constexprs"]["BLOCK"] = 128
    unaligned = json.loads(json.dumps(base))
    del unaligned["attrs"]["y_ptr"]
    kept = kernel_report.one_per_scalar_values([base, n_divisible, one_is_1, other_block, unaligned])
    assert kept == [one_is_1, other_block, unaligned]
