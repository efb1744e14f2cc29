"""The training engine on the smoke profile: outputs, determinism, divergence, DDP (resume: test_resume.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from clipstudy.engine.checkpoint import load_latest
from clipstudy.engine.config import make_config
from clipstudy.engine.train import train

TIMING = {"wall_time_s", "train_samples_per_s", "peak_memory_mb", "eval_time", "git_commit"}


def smoke(demo_data_dir, out, **kw):
    return make_config("smoke", data=str(demo_data_dir), out=str(out), threads=1, **kw)


def comparable(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


def final_weights(out):
    state, _, _ = load_latest(Path(out) / "checkpoints")
    return state


def assert_same_state(a, b):
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def test_run_directory_schema(demo_data_dir, tmp_path):
    metrics = train(smoke(demo_data_dir, tmp_path / "run", seed=1), progress=False)
    out = tmp_path / "run"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["seed"] == 1 and cfg["config"]["profile"] == "smoke"
    assert "torch" in cfg["versions"] and cfg["git_commit"] and cfg["device"]["device"] == "cpu"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["status"] == "completed"
    # Average is the plain mean of TR@1, IR@1 and zero-shot top-1, on each split
    for p in ("", "val_"):
        mean = (saved[f"{p}txt_r1"] + saved[f"{p}img_r1"] + saved[f"{p}zeroshot_top1"]) / 3
        assert saved[f"{p}average"] == pytest.approx(mean)
    history = pd.read_csv(out / "history.csv")
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(history.columns)
    assert history["step"].tolist() == list(range(1, saved["global_step"] + 1))
    # every epoch is evaluated on the validation split only; the test split once, at the end
    epochs = pd.read_csv(out / "epochs.csv")
    assert epochs["epoch"].tolist() == [1, 2]
    assert "average" not in epochs and "txt_r1" not in epochs
    assert epochs.iloc[-1]["val_average"] == pytest.approx(saved["val_average"])
    assert saved["retrieval_n_images"] == len(json.loads((demo_data_dir / "retrieval.json").read_text()))
    assert saved["val_retrieval_n_images"] == len(json.loads((demo_data_dir / "val_retrieval.json").read_text()))
    # a finished run is not trained again
    again = train(smoke(demo_data_dir, tmp_path / "run", seed=1), progress=False)
    assert again["wall_time_s"] == saved["wall_time_s"]


def test_same_seed_same_numbers_different_seed_differs(demo_data_dir, tmp_path):
    a = train(smoke(demo_data_dir, tmp_path / "a", epochs=1), progress=False)
    b = train(smoke(demo_data_dir, tmp_path / "b", epochs=1), progress=False)
    train(smoke(demo_data_dir, tmp_path / "c", epochs=1, seed=5), progress=False)
    la = pd.read_csv(tmp_path / "a" / "history.csv")["loss"]
    assert la.tolist() == pd.read_csv(tmp_path / "b" / "history.csv")["loss"].tolist()
    assert la.tolist() != pd.read_csv(tmp_path / "c" / "history.csv")["loss"].tolist()
    assert comparable(a) == comparable(b)


def test_exploding_learning_rate_ends_as_diverged(demo_data_dir, tmp_path):
    metrics = train(
        smoke(demo_data_dir, tmp_path / "boom", loss="vicreg", optimizer="sgd", lr=1e12, warmup_steps=0), progress=False
    )
    assert metrics["status"] == "diverged"
    assert metrics["diverged_at_step"] >= 1
    saved = json.loads((tmp_path / "boom" / "metrics.json").read_text())
    assert saved["status"] == "diverged" and saved["diverged_at_step"] == metrics["diverged_at_step"]
    history = (
        pd.read_csv(tmp_path / "boom" / "history.csv") if (tmp_path / "boom" / "history.csv").stat().st_size else None
    )
    if history is not None:  # every logged loss is finite: the guard stopped before training on NaN
        assert history["loss"].map(lambda v: v == v and abs(v) != float("inf")).all()


def test_batch_larger_than_data_fails_fast(demo_data_dir, tmp_path):
    from clipstudy.engine.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        train(smoke(demo_data_dir, tmp_path / "big", batch_size=100000), progress=False)


def test_two_process_ddp_matches_one_process(demo_data_dir, tmp_path):
    common = [
        "--profile",
        "smoke",
        "--data",
        str(demo_data_dir),
        "--loss",
        "sogclr",
        "--epochs",
        "1",
        "--small_resnet_norm",
        "group",
        "--threads",
        "1",
        "--no-progress",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "clipstudy", "train", *common, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clipstudy",
            "train",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    ha = pd.read_csv(tmp_path / "one" / "history.csv")["loss"]
    hb = pd.read_csv(tmp_path / "two" / "history.csv")["loss"]
    assert len(ha) == len(hb)
    assert ha.tolist() == pytest.approx(hb.tolist(), rel=1e-4, abs=1e-5)
    for key in ("txt_r1", "img_r1", "zeroshot_top1"):
        assert a[key] == pytest.approx(b[key], abs=1e-6)
    sa, sb = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in sa["model"]:
        assert torch.allclose(sa["model"][k].float(), sb["model"][k].float(), rtol=1e-3, atol=1e-5), k


def test_decoded_image_cache_changes_no_number(demo_data_dir, tmp_path):
    # the demo profile keeps decoded images in memory; it must train exactly as reading from disk
    assert make_config("demo").cache_images and not make_config("paper").cache_images
    cached = train(smoke(demo_data_dir, tmp_path / "cached", epochs=2, cache_images=True), progress=False)
    disk = train(smoke(demo_data_dir, tmp_path / "disk", epochs=2, cache_images=False), progress=False)
    assert comparable(cached) == comparable(disk)
    assert (
        pd.read_csv(tmp_path / "cached" / "history.csv")["loss"].tolist()
        == pd.read_csv(tmp_path / "disk" / "history.csv")["loss"].tolist()
    )
    assert_same_state(final_weights(tmp_path / "cached"), final_weights(tmp_path / "disk"))
