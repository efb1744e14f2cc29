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


def test_the_seen_class_set_holds_only_trained_combinations_like_the_held_out_set(tmp_path):
    """15 classes, 3 per shape, every colour 2 or 3 times, none held out; the folder is what evaluation reads."""
    from collections import Counter

    from clipstudy.data.demo_scenes import HELD_OUT, SEEN_KINDS, class_ids
    from clipstudy.data.zeroshot import ZeroShotSet

    bench = _module("bench_seen_classes")
    classes = bench.write_seen_zeroshot(tmp_path / "seen", per_class=2, image_size=16)
    kinds = [tuple(c.split("_")) for c in classes]
    assert len(classes) == len(class_ids()) == 15
    assert not set(kinds) & HELD_OUT and set(kinds) <= set(SEEN_KINDS)
    assert set(Counter(s for _, s in kinds).values()) == {3}
    assert set(Counter(c for c, _ in kinds).values()) <= {2, 3} and len({c for c, _ in kinds}) == 7
    assert sorted(p.parent.name for p in (tmp_path / "seen").glob("*/*.png")) == sorted(classes * 2)
    names = json.loads((tmp_path / "seen" / "classnames.json").read_text())["classnames"]
    assert names == {c: c.replace("_", " ") for c in classes}
    dataset = ZeroShotSet(tmp_path / "seen", transform=lambda image: image)
    assert len(dataset) == 30 and dataset.classnames == [c.replace("_", " ") for c in classes]
