"""python -m attn_kernels.info and python -m attn_kernels.bench: what a user runs first."""
import csv

import pytest
import torch

from attn_kernels import bench, info


def test_info_reports_versions_and_every_backend():
    text = info.report()
    assert text.startswith("attn_kernels ")
    assert f"torch {torch.__version__}" in text
    for backend in ("cuda", "triton", "reference"):
        assert f"\n  {backend:<10} " in text
    assert "  reference  usable" in text


def test_bench_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "nothing is timed" in out and "backends for a CPU tensor here" in out


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
