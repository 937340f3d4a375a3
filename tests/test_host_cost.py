"""The host-cost tool (attn_kernels.host_cost): that its counters count what they say, that the
kernels are launched through the backends' real launch paths with only their bodies skipped, and
its CSV. No time is asserted: the tool reports times, the tests check what they are made of.

The Triton stub needs compiled (not interpreted) kernels, so its test runs in a process started
without TRITON_INTERPRET, which conftest sets for this one.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import require_cpu_backend

from attn_kernels import bench, host_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


class Flatten(torch.nn.Module):
    def forward(self, x):
        return x.view(x.shape[0], -1)


def test_counter_counts_an_elementwise_op_as_one_launch_and_a_view_as_none():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    double = host_cost.count_directions(Double(), x, torch.randn(2, 3, 4, 4))
    assert double["fwd"] == {"launches": 1, "kernels": 0, "aten_ops": 1, "our_ops": 0, "python_calls": 3,
                             "jit_runs": 0}  # Module.__call__, _call_impl, forward
    assert double["bwd"]["launches"] == 1  # dy * 2; the gradient is x's .grad as it is
    flatten = host_cost.count_directions(Flatten(), x, torch.randn(2, 48))
    assert flatten["fwd"]["launches"] == 0 and flatten["fwd"]["aten_ops"] == 1
    assert flatten["bwd"]["launches"] == 0


def test_triton_stub_refuses_interpreted_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(host_cost.HostCostError, match="TRITON_INTERPRET"):
        with host_cost.stubbed_triton_driver():
            pass


@pytest.mark.cpu_kernels
def test_emulated_cuda_kernels_are_launched_and_counted_the_same_twice():
    require_cpu_backend("cuda")
    first = host_cost.count_direction_launches("se", "cuda")
    assert first == host_cost.count_direction_launches("se", "cuda")
    for direction in host_cost.DIRECTIONS:
        counts = first[direction]
        assert counts["kernels"] >= 1 and counts["our_ops"] >= 1
        assert counts["launches"] >= counts["kernels"] and counts["python_calls"] > 0


STUBBED_TRITON_SE = """
import json, torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from attn_kernels import host_cost
jit_runs = []
run = JITFunction.run
JITFunction.run = lambda self, *args, **kwargs: jit_runs.append(self) or run(self, *args, **kwargs)
setup = host_cost.make_setup("se")
with host_cost.kernel_bodies_skipped("triton") as kernels:
    setup.fused(setup.x).backward(setup.dy)  # the first launches: each through JITFunction.run
    first_launches = len(kernels.take())
JITFunction.run = run
counts = [host_cost.count_direction_launches("se", "triton") for _ in range(2)]
print(json.dumps({"first_jit_runs": len(jit_runs), "first_launches": first_launches, "counts": counts,
                  "driver_restored": getattr(driver, "_active", None) is None,
                  "cuda_initialized": torch.cuda.is_initialized()}))
"""


@pytest.mark.cpu_kernels
def test_stubbed_triton_driver_runs_the_jit_launch_path_and_launches_nothing():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", STUBBED_TRITON_SE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # A kernel's first launch binds, specializes and compiles in JITFunction.run, as on a GPU; the
    # stand-in driver's launcher received every launch, whether through JITFunction.run or a
    # cached compiled kernel's launcher.
    assert result["first_jit_runs"] >= 1 and result["first_launches"] >= 2
    first, second = result["counts"]
    assert first == second
    for direction in host_cost.DIRECTIONS:
        assert first[direction]["kernels"] >= 1 and first[direction]["launches"] >= first[direction]["kernels"]
    assert result["driver_restored"] and not result["cuda_initialized"]


@pytest.mark.cpu_kernels
def test_bench_host_writes_a_row_per_implementation(tmp_path, capsys):
    require_cpu_backend("cuda")
    path = tmp_path / "host_cost.csv"
    assert bench.main(["--host", "--blocks", "se", "--backends", "cuda", "--pairs", "3", "--csv", str(path)]) == 0
    assert "se          cuda" in capsys.readouterr().out
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == host_cost.CSV_COLUMNS
        rows = list(reader)
    assert [(r["block"], r["backend"], r["impl"]) for r in rows] == [("se", "cuda", "eager"), ("se", "cuda", "fused")]
    eager, fused = rows
    assert eager["kernels_fwd"] == "0" and int(fused["kernels_fwd"]) >= 1 and int(fused["kernels_bwd"]) >= 1
    assert all(r["device"] == host_cost.DEVICE and r["shape"] == "2x64x8x8" and r["pairs"] == "3" for r in rows)
    assert all(r["torch"] == torch.__version__ and r["commit"] for r in rows)
