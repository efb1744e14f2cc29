"""The GPU throughput benchmark runs at tiny sizes on the CPU, so it cannot rot unnoticed."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_gpu_throughput_tiny_reports_sane_fields(tmp_path, capsys):
    gpu_throughput = _module("gpu_throughput")
    out = tmp_path / "gpu.json"
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    results = gpu_throughput.run(tiny=True, device="cpu", out=out)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before  # global state restored

    assert json.loads(out.read_text())["samples_per_s"] == results["samples_per_s"]
    # the headline is the best row's, and each row's rate is its samples over its measured time
    assert results["samples_per_s"] == max(row["samples_per_s"] for row in results["rows"])
    for row in results["rows"]:
        assert math.isfinite(row["wall_s"]) and row["wall_s"] > 0
        assert row["samples_per_s"] == pytest.approx(row["steps"] * 4 / row["wall_s"])
        assert row["step_ms"] == pytest.approx(1e3 * row["wall_s"] / row["steps"])
    assert 0.0 <= results["data_wait_fraction"] <= 1.0
    assert results["matmul_flops_per_s"] > 0 and results["model_flops_per_step"] > 0
    assert 0.0 < results["mfu"] and math.isfinite(results["mfu"])
    assert results["config"]["image_size"] == 64 and results["config"]["batch_size"] == 4
    for row in results["rows"]:
        assert row["steps"] == 3 and row["loss_finite"]
        assert row["samples_per_s"] > 0 and 0.0 <= row["data_wait_fraction"] <= 1.0
    assert "no GPU" in results["note"]  # run on the CPU: it says so
    gpu_throughput.print_results(results)
    assert "no GPU" in capsys.readouterr().out


def test_sweep_breakdown_without_runs_says_so(tmp_path, capsys):
    bench_sweep = _module("bench_sweep")
    results = bench_sweep.run(runs=tmp_path / "none", out=tmp_path / "sweep.json")
    bench_sweep.print_results(results)
    assert results["cells"] == [] and not (tmp_path / "sweep.json").exists()
    assert "nothing to report" in capsys.readouterr().out
