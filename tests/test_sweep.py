"""The sweep through papermill: runs the training notebook per cell, skips finished cells,
resumes interrupted ones, records failures and divergence and goes on."""
import json
import os
import signal

import pytest

import clipstudy.train as train_mod
from clipstudy.config import ConfigError, make_config
from clipstudy.__main__ import main as clipstudy_main
from clipstudy.sweep import cell_state, plan_cells, run_sweep


def test_plan_validates_every_cell_before_running(tmp_path):
    cells = plan_cells("smoke", optimizers=["adamw", "adam-nol2"], losses=["clip", "sogclr"], seeds=[0, 1],
                       lr={"adamw": 1e-3}, overrides={"data": str(tmp_path)}, runs_root=tmp_path)
    assert [c.name for c in cells][:3] == ["adamw-clip-s0", "adamw-clip-s1", "adamw-sogclr-s0"]
    assert len(cells) == 8
    nol2 = [c for c in cells if c.label == "adam-nol2"][0]
    assert nol2.params["optimizer"] == "adam" and nol2.params["weight_decay"] == 0.0
    assert cells[0].params["lr"] == 1e-3 and "lr" not in nol2.params
    with pytest.raises(ConfigError, match="loss"):
        plan_cells("smoke", losses=["nope"], overrides={"data": str(tmp_path)}, runs_root=tmp_path)
    with pytest.raises(ConfigError, match="epochs"):
        plan_cells("smoke", overrides={"data": str(tmp_path), "epochs": "x"}, runs_root=tmp_path)


def test_dry_run_lists_states(tmp_path, capsys, demo_data_dir):
    code = clipstudy_main(["sweep", "--profile", "smoke", "--data", str(demo_data_dir), "--runs", str(tmp_path),
                       "--optimizers", "adamw", "--losses", "clip,vicreg", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "adamw-clip-s0" in out and "pending" in out and "2 cells" in out
    assert clipstudy_main(["sweep", "--profile", "smoke", "--losses", "bogus", "--dry-run"]) == 2


def test_sweep_skip_resume_and_continue_after_failure(tmp_path, demo_data_dir, monkeypatch, capsys):
    runs = tmp_path / "runs"
    variants = {"broken": {"optimizer": "adamw", "retrieval_ann": str(tmp_path / "missing.json")},
                "boom": {"optimizer": "sgd", "lr": 1e12, "warmup_steps": 0}}
    common = dict(seeds=[0], overrides={"data": str(demo_data_dir), "threads": 1}, variants=variants, runs_root=runs)
    # An interrupted cell: SIGTERM mid-run leaves a checkpoint and no metrics.
    (partial,) = plan_cells("smoke", optimizers=["adamw"], losses=["sogclr"], **common)
    original = train_mod.train_step
    calls = {"n": 0}

    def step_then_signal(run, batch):
        out = original(run, batch)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(make_config("smoke", **{k: v for k, v in partial.params.items() if k != "profile"}),
                        progress=False)
    monkeypatch.setattr(train_mod, "train_step", original)
    assert cell_state(partial.out)[0] == "partial"

    cells = plan_cells("smoke", optimizers=["adamw", "broken", "boom"], losses=["sogclr"], **common)
    results = run_sweep(cells, progress=False)
    out = capsys.readouterr().out
    assert results["adamw-sogclr-s0"]["status"] == "completed"
    assert results["broken-sogclr-s0"]["status"] == "failed" and "missing.json" in results["broken-sogclr-s0"]["error"]
    assert results["boom-sogclr-s0"]["status"] == "diverged"
    assert "FAILED" in out and "DIVERGED" in out
    # the interrupted cell resumed from its checkpoint (the executed notebook says so) instead of restarting
    executed = (partial.out / "train.ipynb").read_text()
    assert "resumed from" in executed and "ckpt-00000005.pt" in executed
    assert json.loads((partial.out / "metrics.json").read_text())["global_step"] == 8

    # Second sweep: finished cells are skipped untouched; the failed one is tried again.
    stamp = {c.name: (c.out / "metrics.json").stat().st_mtime_ns for c in cells}
    results = run_sweep(cells, progress=False)
    out = capsys.readouterr().out
    assert "adamw-sogclr-s0" in out and "skipped (done" in out and "skipped (diverged" in out
    assert (partial.out / "metrics.json").stat().st_mtime_ns == stamp["adamw-sogclr-s0"]
    assert (runs / "boom-sogclr-s0" / "metrics.json").stat().st_mtime_ns == stamp["boom-sogclr-s0"]
    assert (runs / "broken-sogclr-s0" / "metrics.json").stat().st_mtime_ns != stamp["broken-sogclr-s0"]


def test_bad_papermill_parameter_type_fails_naming_it(tmp_path, demo_data_dir):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook("notebooks/train.ipynb", str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   progress_bar=False,
                                   parameters={"profile": "smoke", "data": str(demo_data_dir),
                                               "out": str(tmp_path / "run"), "seed": "zero"})
    assert "seed" in str(err.value) and "ConfigError" in str(err.value)
