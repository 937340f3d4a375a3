"""The ledger (attn_kernels.ledger): that what it counts is what the kernels and ops move.

Its counters are checked on launches whose traffic is known exactly (a copy kernel, an
elementwise Triton kernel with a masked tail, aten ops with broadcasting and views), its
extrapolation from N = 1 and 2 against a count at a larger N, its dry run against the launches
of a real run, and the fused kernels' traffic against the figures the README states. The CUDA
emulation tests skip where the emulation is not built, the Triton ones where the kernels run
compiled (a GPU: the ledger counts on CPU).
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_GPU, require_cpu_backend

from attn_kernels import ledger

pytestmark = pytest.mark.skipif(HAS_GPU, reason="the ledger counts kernels run on the CPU (interpreter, emulation)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_bytes(launches, kind=None):
    ks = [launch for launch in launches if launch.kind != "torch" and (kind is None or launch.kind == kind)]
    return sum(launch.read for launch in ks), sum(launch.written for launch in ks)


# ---- the counters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("matching, n, expected", [
    (range(1, 200), 32, 1),     # below a threshold: the smallest pair
    (range(43, 200), 128, 43),  # from a threshold on (CBAM's split of C at 512x28x28): bisected
    (range(127, 200), 128, 127),  # the pair may end at N itself
    (range(128, 200), 128, None),  # only N and above: no pair below it
    ({5, 6, 20, 21, 22, 128}, 128, 5),  # neither: the scan finds the smallest pair
])
def test_counting_pair_is_the_smallest_matching_pair(matching, n, expected):
    probed = []

    def launches_wanted(k):
        probed.append(k)
        return k in matching

    assert ledger.counting_pair(launches_wanted, n) == expected
    if expected == 43:
        assert len(probed) < 12  # bisected, not scanned


def test_emulated_copy_is_counted_exactly():
    require_cpu_backend("cuda")
    x = torch.arange(1000, dtype=torch.float32)
    with ledger.Recorder() as rec:
        torch.ops.attn_kernels_emulated._selftest("copy", x)
    (launch,) = ledger.kernels_of(rec.take())
    assert launch.name == "copy_kernel" and launch.kind == "cuda"
    assert (launch.read, launch.written) == (4000, 4000)
    assert (launch.requested_read, launch.requested_written) == (4000, 4000)
    assert launch.grid == (16, 1, 1) and launch.threads == 64


def test_emulated_dry_run_logs_without_running():
    require_cpu_backend("cuda")
    x = torch.arange(1000, dtype=torch.float32)
    with ledger.Recorder(dry_run=True) as rec:
        out = torch.ops.attn_kernels_emulated._selftest("copy", x)
    (launch,) = ledger.kernels_of(rec.take())
    assert launch.grid == (16, 1, 1) and (launch.read, launch.written) == (0, 0)
    assert not torch.equal(out, x)  # the kernel did not run (and the dry run did not fill the zeros either)


def test_triton_masked_lanes_are_not_counted():
    require_cpu_backend("triton")
    import attn_kernels

    n = 3 * 1024 + 5  # a masked tail in the last program
    x, logits = torch.randn(1, 1, 1, n), torch.randn(1, 1, 1, n)
    with attn_kernels.use_backend("triton"), ledger.Recorder() as rec:
        attn_kernels.functional.sigmoid_gate(x, logits)
    (launch,) = ledger.kernels_of(rec.take())
    assert launch.kind == "triton" and launch.name == "sigmoid_gate:_sigmoid_gate_kernel"
    assert (launch.read, launch.written) == (2 * 4 * n, 4 * n)
    assert launch.grid == (4, 1, 1)


def test_torch_ops_read_inputs_and_write_outputs():
    a = torch.randn(8, 16)
    b = torch.randn(16)  # broadcast: read once
    with ledger.Recorder() as rec:
        c = a + b
        a.t()  # a view: no launch
        c.copy_(a)  # reads a only
        c.zero_()  # writes only
        torch.empty(100)  # an allocation: nothing
    launches = rec.take()
    assert [(launch.name, launch.read, launch.written) for launch in launches] == [
        ("add.Tensor", 8 * 16 * 4 + 16 * 4, 8 * 16 * 4),
        ("copy_.default", 8 * 16 * 4, 8 * 16 * 4),
        ("zero_.default", 0, 8 * 16 * 4),
    ]
    expanded = b.expand(8, 16)
    assert ledger.tensor_bytes(expanded) == 16 * 4


def test_saved_for_backward():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(8, 8))
    rec = ledger.Recorder()
    rec.parameters = {ledger._storage_key(w)}
    with rec, rec.saved_tensors():
        y = torch.sigmoid(x @ w)  # saves x (w excluded) and sigmoid's output
    assert sorted(rec.saved.values()) == [4 * 8 * 4, 4 * 8 * 4]
    del y


# ---- scaling and dry runs --------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["se", "cbam", "gc"])
def test_extrapolation_and_dry_run_match_a_real_count(block):
    backend = require_cpu_backend("cuda")
    import attn_kernels
    from attn_kernels.bench import BLOCKS

    c, h, w, n = 64, 6, 6, 5
    with attn_kernels.use_backend(backend):
        module = BLOCKS[block].fused(c)
        at = {k: ledger.count_module(module, ledger.make_input(k, c, h, w, torch.float32, "channels_last"))
              for k in (1, 2, n)}
        dry = ledger.count_module(module, ledger.make_input(n, c, h, w, torch.float32, "channels_last", empty=True),
                                  dry_run=True)
    scaled, exact = ledger.scaled_to(dry, {1: at[1], 2: at[2]}, n)
    for direction in ledger.DIRECTIONS:
        real, dry_kernels = ledger.kernels_of(at[n].launches[direction]), ledger.kernels_of(dry.launches[direction])
        assert [(k.name, k.grid, k.threads) for k in dry_kernels] == [(k.name, k.grid, k.threads) for k in real]
        # The dry run's torch ops are the real run's, counted exactly.
        real_ops = [(op.name, op.read, op.written) for op in at[n].launches[direction] if op.kind == "torch"]
        assert [(op.name, op.read, op.written) for op in dry.launches[direction] if op.kind == "torch"] == real_ops
        got, want = kernel_bytes(scaled[direction]), kernel_bytes(at[n].launches[direction])
        if exact:
            assert got == want
        else:  # only the partial sums of grids chosen from N differ
            x_bytes = n * c * h * w * 4
            assert all(abs(g - r) <= 0.05 * x_bytes for g, r in zip(got, want)), (got, want)
    assert dry.saved == at[n].saved


def test_eager_on_meta_counts_what_cpu_runs():
    import timm

    module = timm.layers.cbam.CbamModule(32)
    x = ledger.make_input(3, 32, 5, 5, torch.float32, "nchw")
    real = ledger.count_module(module, x)
    meta = ledger.count_module(module.to("meta"), x.to("meta"))
    for direction in ledger.DIRECTIONS:
        assert ([(op.name, op.read, op.written) for op in meta.launches[direction]]
                == [(op.name, op.read, op.written) for op in real.launches[direction]])
    assert meta.saved == real.saved


# ---- the fused kernels' traffic, as the README states it (units of |x|) -----------------------------

# Kernel bytes per direction (torch ops between them excluded): at least the figure, and above it by
# no more than the per-(n, c) and per-pixel statistics and partial sums: under 0.2 |x| at C = 256
# and 16x16 pixels (CBAM's backward: 0.16).
README_PASSES = {"se": (3, 4), "eca": (3, 4), "cbam": (4, 6), "gc": (3, 5), "gca": (3, 4)}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("block", sorted(README_PASSES))
def test_fused_kernels_move_what_the_readme_says(block, layout):
    backend = require_cpu_backend("cuda")
    import attn_kernels
    from attn_kernels.bench import BLOCKS

    n, c, h, w = 2, 256, 16, 16  # statistics of a few bytes per pixel or channel: a few % of |x|
    with attn_kernels.use_backend(backend):
        counted = ledger.count_module(BLOCKS[block].fused(c), ledger.make_input(n, c, h, w, torch.float32, layout))
    x_bytes = n * c * h * w * 4
    for direction, passes in zip(ledger.DIRECTIONS, README_PASSES[block]):
        moved = sum(kernel_bytes(counted.launches[direction], backend)) / x_bytes
        assert passes <= moved <= passes + 0.2, (direction, moved)
    assert counted.saved <= 1.1 * x_bytes  # x and statistics


# ---- the command ----------------------------------------------------------------------------------

def test_command_writes_the_tables(tmp_path):
    require_cpu_backend("cuda")
    done = subprocess.run(
        [sys.executable, "-m", "attn_kernels.ledger", "--blocks", "se", "--stages", "64x6x6", "--batch", "4",
         "--dtypes", "fp32", "--layouts", "nchw", "--no-compile", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ESTIMATES for an H100" in done.stdout
    rows = ledger.read_csv(tmp_path / "ledger.csv")
    assert {(r["impl"], r["direction"]) for r in rows} == {
        (impl, d) for impl in ("eager", "fused:cuda") for d in ("fwd", "bwd", "fwd+bwd")}
    assert ledger.read_csv(tmp_path / "occupancy.csv")


def test_readme_table_is_generated_from_the_committed_csv():
    rows = ledger.read_csv(os.path.join(ROOT, "benchmarks", "results", "ledger.csv"))
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert ledger.update_readme(readme, ledger.readme_table(rows)) == readme, (
        "README's traffic table differs from benchmarks/results/ledger.csv: "
        "python -m attn_kernels.ledger --readme-only README.md")
