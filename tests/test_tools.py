"""python -m attn_kernels.info, .bench and .bench_train, and examples/train.py: what a user runs first."""
import csv
import os
import subprocess
import sys

import pytest
import torch

import attn_kernels
from attn_kernels import bench, bench_train, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_reports_versions_and_every_backend():
    text = info.report()
    assert text.startswith("attn_kernels ")
    assert f"torch {torch.__version__}" in text
    for backend in ("cuda", "triton", "reference"):
        assert f"\n  {backend:<10} " in text
    assert "  reference  usable" in text


def test_bench_without_gpu_runs_the_ledger(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main(["--blocks", "se", "--stages", "16x4x4", "--batch", "2", "--dtypes", "fp32", "--layouts", "nchw",
                       "--no-compile", "--jobs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nothing is timed" in out and "backends for a CPU tensor here" in out
    assert "ESTIMATES for an H100" in out and (tmp_path / "ledger.csv").exists()


def test_bench_arguments():
    args = bench.parse_args(["--impls", "cuda", "eager"])
    assert args.impls == ["eager", "cuda"] and args.batch == [32, 128]
    assert bench.parse_args(["--quick"]).batch == [32]
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "0"])


@pytest.mark.gpu
def test_bench_writes_csv_rows(tmp_path):
    path = tmp_path / "bench.csv"
    bench.main(["--quick", "--batch", "2", "--dtypes", "fp32", "--layouts", "channels_last",
                "--impls", "eager", "triton", "cuda", "--csv", str(path)])
    rows = list(csv.DictReader(path.open()))
    assert {r["impl"] for r in rows} >= {"eager", "triton"}
    assert {r["direction"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert all(float(r["median_ms"]) > 0 and r["gpu"] == torch.cuda.get_device_name() for r in rows)


def test_bench_train_arguments_and_attention_free_twin():
    args = bench_train.parse_args(["--impls", "compile+patched", "eager", "--models", "seresnet50"])
    assert args.impls == ["eager", "compile+patched"] and args.batch == 128 and args.dtype == "bf16"
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--steps", "0"])
    model = bench_train.create_model("resnet50_cbam")
    bare = bench_train.without_attention(model)
    assert len(attn_kernels.patch_report(model).entries) == 16 and not attn_kernels.patch_report(bare).entries
    assert [type(b.se) for b in bare.layer1] == [torch.nn.Identity] * 3
    assert len(attn_kernels.patch_report(model).with_status("patchable")) == 16  # the model itself is unchanged


@pytest.mark.gpu
def test_bench_train_writes_csv_rows(tmp_path):
    path = tmp_path / "train.csv"
    bench_train.main(["--models", "seresnet50", "--impls", "eager", "patched", "--batch", "4", "--image-size", "64",
                      "--steps", "2", "--warmup", "1", "--csv", str(path)])
    rows = list(csv.DictReader(path.open()))
    assert [r["impl"] for r in rows] == ["eager", "patched"]
    assert all(float(r["step_ms"]) > 0 and r["attention_overhead"] for r in rows)


def test_train_example_runs_and_reports_throughput():
    """A few steps of examples/train.py on CPU (the reference backend there), patched."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train.py"), "--model", "resnet18", "--block-attn", "se",
         "--patch", "--image-size", "32", "--batch-size", "4", "--steps", "3", "--warmup", "1", "--device", "cpu",
         "--channels-last", "--optimizer", "adam"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "8 patched" in result.stdout and "images/s over the last 2 steps" in result.stdout


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_example_under_torchrun(parallel):
    """examples/train.py in 2 processes (torchrun --standalone: localhost, a free port), gloo on
    CPU: rank 0 alone prints, images/s of both processes together."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "examples", "train.py"), "--model", "resnet18", "--block-attn", "cbam", "--patch",
         "--image-size", "32", "--batch-size", "2", "--steps", "3", "--warmup", "1", "--device", "cpu", "--amp", "none",
         *(["--fsdp"] if parallel == "fsdp" else [])],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("8 patched") == 1, result.stdout
    assert f"2 processes ({'FSDP2' if parallel == 'fsdp' else 'DDP'})" in result.stdout
    assert "images/s over the last 2 steps" in result.stdout and ", 2 processes)" in result.stdout
