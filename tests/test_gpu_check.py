"""The prepared GPU check runs at toy sizes on the CPU, so it is ready when a GPU is, and says it needs one."""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _gpu_check():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("gpu_check")


def test_gpu_check_tiny_on_cpu_writes_one_json_and_says_it_needs_a_gpu(tmp_path, capsys):
    gpu_check = _gpu_check()
    results = gpu_check.run(tiny=True, device="cpu", out=tmp_path / "check.json")
    assert json.loads((tmp_path / "check.json").read_text())["wall_s"] == results["wall_s"]
    assert "no GPU" in results["note"] and results["device"] == "cpu"
    t = results["training"]
    assert t["samples_per_s"] > 0 and 0 < t["mfu"] and math.isfinite(t["mfu"]) and t["model_flops_per_step"] > 0
    assert results["peak_memory_gb"] is None and results["fits_goal"] is None  # no GPU memory to measure
    (loader,) = results["loader"]
    assert loader["workers"] == 1 and loader["samples_per_s"] > 0
    assert loader["ratio_to_training"] == pytest.approx(loader["samples_per_s"] / t["samples_per_s"])
    r = results["retrieval_eval"]
    assert (r["images"], r["captions"]) == (100, 500) and r["seconds"] > 0
    assert results["ddp"] == {"skipped": "needs 2+ GPUs (found 0)"}
    gpu_check.print_results(results)
    out = capsys.readouterr().out
    assert "NOTE:" in out and "no GPU" in out and "DDP: needs 2+ GPUs" in out


@pytest.mark.slow
@pytest.mark.faults  # excluded from the default run like the other slow end-to-end tests: `make test-faults`
@pytest.mark.timeout(600)
def test_gpu_check_ddp_part_runs_two_ranks(tmp_path):
    """The 2-process part, on gloo here (NCCL on 2+ GPUs): the same torchrun command trains two steps."""
    gpu_check = _gpu_check()
    results = gpu_check.run(tiny=True, device="cpu", out=None, ddp_on_cpu=True)
    ddp = results["ddp"]
    assert ddp["returncode"] == 0, ddp.get("error")
    assert ddp["world_size"] == 2 and ddp["global_step"] == 2 and ddp["backend"].startswith("gloo")
