"""Results never go stale unnoticed: the configuration fingerprint, stale sweep cells, max_steps as a cut
of the full run, already-complete reruns, no silent data replacement, `make clean` keeping runs.

The numbered cases are those of issue 15 ("Results never go stale or mislabeled").
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_DEMO

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.data.demo import DifferentDataSet, make_demo_data
from clipstudy.engine import records
from clipstudy.engine.checkpoint import load_latest
from clipstudy.engine.config import ConfigError, make_config
from clipstudy.engine.fingerprint import differences, fingerprint
from clipstudy.engine.train import train
from clipstudy.study.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[1]


def smoke(data, out, **kw):
    return make_config("smoke", data=str(data), out=str(out), threads=1, **kw)


def snapshot(folder: Path) -> dict:
    """Digest of every run file under ``folder`` (lock files aside: they hold the last holder's pid; the
    sweep's own record of its last settings, sweep.json, aside: it is not a run)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock") and p.name != "sweep.json"
    }


# ------------------------------------------------------------------ the fingerprint itself
def test_fingerprint_holds_what_changes_results_and_nothing_else(demo_data_dir, tmp_path, monkeypatch):
    base = fingerprint(smoke(demo_data_dir, tmp_path / "a"))
    # case 4: the same folder spelled two ways is the same configuration
    monkeypatch.chdir(demo_data_dir.parent)
    relative = make_config("smoke", data=f"./{demo_data_dir.name}/../{demo_data_dir.name}", out="elsewhere")
    explicit = make_config(
        "smoke",
        train_ann=str(demo_data_dir / "train.json"),
        train_images=str(demo_data_dir / "images"),
        retrieval_ann=str(demo_data_dir / "retrieval.json"),
        retrieval_images=str(demo_data_dir / "images"),
        zeroshot_images=str(demo_data_dir / "zeroshot"),
        val_retrieval_ann=str(demo_data_dir / "val_retrieval.json"),
        val_retrieval_images=str(demo_data_dir / "images"),
        val_zeroshot_images=str(demo_data_dir / "val_zeroshot"),
        tokenizer=str(demo_data_dir / "tokenizer"),
    )
    assert fingerprint(relative)["config"] == base["config"]
    assert fingerprint(explicit)["config"] == base["config"]
    # where and how fast a run executes, and where it stops, are not part of it
    neutral = smoke(
        demo_data_dir,
        tmp_path / "b",
        max_steps=3,
        device="cpu",
        log_every=5,
        keep_checkpoints=1,
        cache_images=False,
        num_workers=1,
    )
    assert fingerprint(neutral)["digest"] == base["digest"]
    # what changes the numbers is, and the difference is named old -> new
    changed = fingerprint(smoke(demo_data_dir, tmp_path / "a", lr=0.05))
    assert changed["digest"] != base["digest"]
    assert differences(base, changed) == ["lr 0.002 -> 0.05"]
    assert differences(
        base, fingerprint(smoke(demo_data_dir, tmp_path / "a", loss_params={"gamma": 0.5}, loss="sogclr"))
    ) == ["loss clip -> sogclr", "loss_params.gamma none -> 0.5"]


def test_a_sweep_pass_lists_the_zero_shot_folder_once_and_later_passes_see_changes(
    demo_data_dir, tmp_path, monkeypatch, capsys
):
    from clipstudy.engine import fingerprint as fp

    walked = []
    real_walk = os.walk

    def counting_walk(root, *args, **kwargs):
        walked.append(Path(root).name)
        return real_walk(root, *args, **kwargs)

    for cell in ("adamw-clip-s0", "adamw-sogclr-s0", "sgd-clip-s0", "sgd-sogclr-s0"):  # finished runs to check
        records.write_metrics(tmp_path / "runs" / cell, {"status": "completed", "average": 1.0})
        (tmp_path / "runs" / cell / "config.json").write_text(json.dumps({"fingerprint": {"digest": "old"}}))
    monkeypatch.setattr(os, "walk", counting_walk)
    args = [
        "--profile",
        "smoke",
        "--data",
        str(demo_data_dir),
        "--runs",
        str(tmp_path / "runs"),
        "--optimizers",
        "adamw,sgd",
        "--losses",
        "clip,sogclr",
        "--dry-run",
    ]
    assert sweep_main(args) == 0
    assert capsys.readouterr().out.count(" stale (") == 4
    assert walked.count("zeroshot") == 1 and walked.count("tokenizer") == 1  # once for 4 cells
    # outside a pass nothing is cached: a folder changed between passes is seen (on a copy of the shared data)
    data = shutil.copytree(demo_data_dir, tmp_path / "data")
    config = make_config("smoke", data=str(data), out=str(tmp_path / "x"))
    before = fp.fingerprint(config)["data"]["zeroshot_listing"]
    zeroshot = Path(config.resolved_paths()["zeroshot_images"])
    (next(p for p in zeroshot.iterdir() if p.is_dir()) / "extra.png").write_bytes(b"x")
    assert fp.fingerprint(config)["data"]["zeroshot_listing"] != before


def test_fingerprint_sees_regenerated_data_under_the_same_path(demo_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    before = fingerprint(smoke(data, tmp_path / "run"))
    make_demo_data(data, **{**TINY_DEMO, "train_size": 48}, force=True)
    after = fingerprint(smoke(data, tmp_path / "run"))
    assert before["config"] == after["config"] and before["digest"] != after["digest"]
    changes = differences(before, after)
    assert changes[0] == "data.demo_manifest.parameters.train_size 64 -> 48"
    assert any(c.startswith("data.train_ann ") for c in changes)
    # an edited annotation file of a non-demo set (no manifest) is seen too
    (data / "manifest.json").unlink()
    edited = fingerprint(smoke(data, tmp_path / "run"))
    entries = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(entries[:-1]))
    assert [c.split(" ")[0] for c in differences(edited, fingerprint(smoke(data, tmp_path / "run")))] == [
        "data.train_ann"
    ]


# ------------------------------------------------- case 7: max_steps is a cut of the full run
def test_max_steps_cuts_the_full_run_and_a_rerun_extends_it(demo_data_dir, tmp_path, capfd):
    full = train(smoke(demo_data_dir, tmp_path / "full"), progress=False)
    assert (full["steps_completed"], full["steps_total"], full["truncated"], full["epochs_completed"]) == (
        8,
        8,
        False,
        2,
    )  # 64 pairs / batch 16 = 4 steps per epoch, 2 epochs

    out = tmp_path / "cut"
    cut = train(smoke(demo_data_dir, out, max_steps=3), progress=False)
    assert cut["status"] == "completed"
    assert (cut["steps_completed"], cut["steps_total"], cut["truncated"], cut["epochs_completed"]) == (3, 8, True, 0)
    # the schedule is the full run's: the first 3 learning rates are the full run's first 3
    full_lr = pd.read_csv(tmp_path / "full" / "history.csv")["lr"].tolist()
    cut_lr = pd.read_csv(out / "history.csv")["lr"].tolist()
    assert cut_lr == full_lr[:3]
    # it was evaluated where it stopped, at a fractional epoch
    assert pd.read_csv(out / "epochs.csv")[["epoch", "step"]].values.tolist() == [[0.75, 3]]
    capfd.readouterr()

    # a larger max_steps (not part of the fingerprint) continues the same run from its checkpoint
    longer = train(smoke(demo_data_dir, out, max_steps=6), progress=False)
    assert "resumed from" in capfd.readouterr().err
    assert (longer["steps_completed"], longer["truncated"], longer["epochs_completed"]) == (6, True, 1)
    # and no max_steps finishes it, with the numbers of the uncut run
    extended = train(smoke(demo_data_dir, out), progress=False)
    assert (extended["steps_completed"], extended["truncated"], extended["epochs_completed"]) == (8, False, 2)
    a, _, _ = load_latest(out / "checkpoints")
    b, _, _ = load_latest(tmp_path / "full" / "checkpoints")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert pd.read_csv(out / "history.csv")["lr"].tolist() == full_lr
    for key in ("txt_r1", "img_r1", "zeroshot_top1", "average"):
        assert extended[key] == full[key]


def test_rerunning_a_finished_run_says_complete_and_changes_nothing(demo_data_dir, tmp_path, capfd):
    out = tmp_path / "run"
    first = train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    before = snapshot(out)
    capfd.readouterr()
    again = train(smoke(demo_data_dir, out, max_steps=2), progress=False)
    err = capfd.readouterr().err
    assert "already complete (completed, stopped at step 2 of 8)" in err and "resumed from" not in err
    assert again == first and snapshot(out) == before
    # from the command line: exit 0, and the same line
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipstudy",
            "train",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--out",
            str(out),
            "--max_steps",
            "2",
            "--threads",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stderr and "resumed from" not in result.stderr
    assert json.loads(result.stdout)["steps_completed"] == 2 and snapshot(out) == before


def test_a_run_on_other_data_is_refused_naming_it(demo_data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    out = tmp_path / "run"
    train(smoke(data, out, max_steps=2), progress=False)
    before = snapshot(out)
    make_demo_data(data, **{**TINY_DEMO, "seed": 1}, force=True)  # same path, other images and captions
    with pytest.raises(ConfigError, match=r"different configuration \(data.demo_manifest.parameters.seed 0 -> 1"):
        train(smoke(data, out, max_steps=2), progress=False)
    assert snapshot(out) == before


# ------------------------------------------------------ case 1: stale cells are not "done"
def sweep_args(data, runs, *more):
    return [
        "--profile",
        "smoke",
        "--data",
        str(data),
        "--runs",
        str(runs),
        "--optimizers",
        "adamw,sgd",
        "--losses",
        "clip",
        "--set",
        "max_steps=2",
        "--set",
        "threads=1",
        *more,
    ]


def test_sweep_shows_stale_cells_and_refuses_them_unless_told(demo_data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    for optimizer in ("adamw", "sgd"):  # the cells as an earlier sweep left them (demo lr 0.002)
        train(smoke(demo_data_dir, runs / f"{optimizer}-clip-s0", optimizer=optimizer, max_steps=2), progress=False)
    assert sweep_main(sweep_args(demo_data_dir, runs, "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, cell in zip(lines, ("adamw-clip-s0", "sgd-clip-s0")):
        assert line.startswith(f"{cell:<28} done (average ") and line.endswith(", stopped at step 2 of 8)")

    # the README's example: only the cells whose learning rate changes are stale
    assert sweep_main(sweep_args(demo_data_dir, runs, "--lr", "adamw=2e-3,sgd=5e-2", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["adamw-clip-s0", "done"]
    assert lines[1] == f"{'sgd-clip-s0':<28} stale (lr 0.002 -> 0.05)"
    # a larger max_steps is not stale: the cut cells continue
    assert sweep_main(sweep_args(demo_data_dir, runs, "--set", "max_steps=0", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "adamw-clip-s0                partial (stopped at step 2 of 8; continues)" in out

    # a real sweep does not run the stale cell: it says so and exits 1; nothing changes on disk
    before = snapshot(runs)
    assert sweep_main(sweep_args(demo_data_dir, runs, "--lr", "sgd=5e-2")) == 1
    captured = capsys.readouterr()
    assert "sgd-clip-s0                  NOT RUN: stale (lr 0.002 -> 0.05)" in captured.out
    assert "1 completed, 1 stale" in captured.out and "--rerun-stale" in captured.err
    assert snapshot(runs) == before

    # --rerun-stale archives the old run (kept, out of the report's reach) and trains the cell afresh
    assert sweep_main(sweep_args(demo_data_dir, runs, "--lr", "sgd=5e-2", "--rerun-stale")) == 0
    assert "2 completed" in capsys.readouterr().out
    (archived,) = (runs / "stale").iterdir()
    assert archived.name.startswith("sgd-clip-s0-")
    assert json.loads((archived / "config.json").read_text())["config"]["lr"] == 0.002
    assert snapshot(archived) == {
        k.removeprefix("sgd-clip-s0/"): v for k, v in before.items() if k.startswith("sgd-clip-s0/")
    }
    assert json.loads((runs / "sgd-clip-s0" / "config.json").read_text())["config"]["lr"] == 0.05
    assert (
        records.read_metrics(runs / "sgd-clip-s0")["fingerprint"]
        == fingerprint(smoke(demo_data_dir, runs / "sgd-clip-s0", optimizer="sgd", lr=0.05))["digest"]
    )
    assert sweep_main(sweep_args(demo_data_dir, runs, "--lr", "sgd=5e-2", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[:2]] == ["done", "done"]


# ------------------------------------------------------ case 3: no silent data replacement
def test_make_demo_data_refuses_to_replace_another_set(demo_data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    before = snapshot(data)
    args = [
        "--out",
        str(data),
        "--seed",
        "0",
        "--image-size",
        "32",
        "--retrieval-size",
        "16",
        "--zeroshot-per-class",
        "3",
        "--zeroshot-classes",
        "4",
    ]
    assert clipstudy_main(["make-demo-data", *args, "--train-size", "16"]) == 2
    message = capsys.readouterr().err.strip()
    assert message == (
        f"error: make-demo-data: {data} holds another data set (train_size=64), not the one asked for "
        "(train_size=16); runs trained on it would lose their data: pass --force to replace it, "
        "or choose another --out"
    )
    assert snapshot(data) == before
    with pytest.raises(DifferentDataSet):
        make_demo_data(data, **{**TINY_DEMO, "seed": 3})
    assert snapshot(data) == before
    # files of a set without its manifest (interrupted, or not a demo set) are not replaced either
    (data / "manifest.json").unlink()
    assert clipstudy_main(["make-demo-data", *args, "--train-size", "64"]) == 2
    assert "no readable manifest.json" in capsys.readouterr().err
    # --force replaces
    assert clipstudy_main(["make-demo-data", *args, "--train-size", "16", "--force"]) == 0
    assert len(json.loads((data / "train.json").read_text())) == 16


# ----------------------------------------------------- nothing deletes results by accident
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_keeps_runs_and_clean_runs_asks(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    run = tmp_path / "reports" / "runs" / "demo" / "adamw-clip-s0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (tmp_path / "build").mkdir()
    make = ["make", "--no-print-directory", "-C", str(tmp_path)]
    assert subprocess.run(make + ["clean"], capture_output=True).returncode == 0
    assert run.is_dir() and not (tmp_path / "build").exists()
    refused = subprocess.run(make + ["clean-runs"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and run.is_dir()
    assert "This deletes 1 run(s) in reports/runs/" in refused.stdout and "CONFIRM=1" in refused.stdout
    done = subprocess.run(make + ["clean-runs", "CONFIRM=1"], capture_output=True, text=True)
    assert done.returncode == 0 and not (tmp_path / "reports" / "runs").exists()
