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
# The tests of the fingerprint's inputs finish in seconds: a limit well under the suite's 300 s makes a change that
# never ends (a read loop that never sees the end of a file) fail in a minute (`make mutation` meets such mutants).
QUICK = pytest.mark.timeout(60)


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
@QUICK
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


@QUICK
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


@QUICK
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


@QUICK
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


# ------------------------------------------------ each input of the fingerprint, against a reference written here
# A data folder in the demo layout, written byte by byte (no generator), so every digest below is the SHA-256 of
# bytes the test wrote, and every listing a list of names written out by hand.
HAND_MADE = {
    "train.json": b'[{"image": "a.png", "caption": "a red circle"}]',
    "retrieval.json": b'[{"image": "b.png", "caption": ["a blue square"]}]',
    "val_retrieval.json": b'[{"image": "c.png", "caption": ["a green cross"]}]',
    "zeroshot/classnames.json": b'{"classnames": {"red_circle": "red circle"}, "templates": ["a {}."]}',
    "zeroshot/red_circle/0.png": b"png 0",
    "zeroshot/red_circle/1.png": b"png 1",
    "val_zeroshot/classnames.json": b'{"classnames": {"blue_cross": "blue cross"}, "templates": ["a {}."]}',
    "val_zeroshot/blue_cross/0.png": b"val png 0",
    "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nred\n",
    "tokenizer/tokenizer_config.json": b"{}",
    "manifest.json": b'{"generator_version": 2, "parameters": {"seed": 0}, "digest": "d0", "created": "today"}',
}


def hand_made_data(root: Path) -> Path:
    for name, content in HAND_MADE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def listing(*names: str) -> str:
    """The listing digest of a folder holding ``names`` (relative paths, in the order written)."""
    return sha(b"".join(name.encode() + b"\0" for name in names))


def listing_with_contents(root: Path, *names: str) -> str:
    return sha(b"".join(name.encode() + b"\0" + sha((root / name).read_bytes()).encode() for name in names))


def expected_data(root: Path, *, evaluate_test: bool = True) -> dict:
    """The data part of the fingerprint of the hand-made folder, in the order the fingerprint lists it."""
    read = lambda name: (root / name).read_bytes()  # noqa: E731
    test = {
        "retrieval_ann": sha(read("retrieval.json")),
        "zeroshot_listing": listing("classnames.json", "red_circle/0.png", "red_circle/1.png"),
        "zeroshot_classnames": sha(read("zeroshot/classnames.json")),
    }
    validation = {
        "val_retrieval_ann": sha(read("val_retrieval.json")),
        "val_zeroshot_listing": listing("blue_cross/0.png", "classnames.json"),
        "val_zeroshot_classnames": sha(read("val_zeroshot/classnames.json")),
    }
    return {
        "demo_manifest": {"generator_version": 2, "parameters": {"seed": 0}, "digest": "d0"},
        "train_ann": sha(read("train.json")),
        **(test if evaluate_test else {}),
        **validation,
        "tokenizer": listing_with_contents(root / "tokenizer", "tokenizer_config.json", "vocab.txt"),
    }


@QUICK
def test_file_digest_is_the_sha256_of_the_files_bytes(tmp_path):
    from clipstudy.engine.fingerprint import file_digest

    big = bytes(range(256)) * 5000  # 1.28 MB: more than one read block
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "small").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "big") == sha(big)
    assert file_digest(str(tmp_path / "small")) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_digest(tmp_path / "empty") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert file_digest(tmp_path / "absent") == "missing"
    (tmp_path / "small").write_bytes(b"abcd")  # rewritten in place: the new bytes count
    assert file_digest(tmp_path / "small") == sha(b"abcd")


@QUICK
def test_folder_digest_lists_relative_paths_and_with_contents_the_bytes_too(tmp_path):
    from clipstudy.engine.fingerprint import folder_digest

    root = tmp_path / "folder"
    for name, content in {"z.txt": b"z", "a.txt": b"a", "sub/b.txt": b"b", "sub/deeper/c.txt": b"c"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / "empty_folder").mkdir()  # no file: not listed
    names = ("a.txt", "sub/b.txt", "sub/deeper/c.txt", "z.txt")
    assert folder_digest(root) == listing(*names)
    assert folder_digest(str(root), contents=True) == listing_with_contents(root, *names)
    assert folder_digest(tmp_path / "absent") == folder_digest(root / "a.txt") == "missing"
    (root / "a.txt").write_bytes(b"A, edited")  # same names, other bytes: only the contents digest sees it
    assert folder_digest(root) == listing(*names)
    assert folder_digest(root, contents=True) == listing_with_contents(root, *names)
    assert folder_digest(root, contents=True) != listing_with_contents(root, *names[:-1])


@QUICK
def test_listings_are_cached_for_one_pass_and_a_nested_pass_shares_it(tmp_path, monkeypatch):
    from clipstudy.engine import fingerprint as fp

    walked = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda root, *a, **k: walked.append(Path(root).name) or real_walk(root, *a, **k))
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
        (folder / f"{folder.name}.png").write_bytes(b"x")
    with fp.listings_cached():
        first = fp.folder_digest(one)
        assert first == listing("one.png") and fp.folder_digest(one) == first and walked == ["one"]
        assert fp.folder_digest(two) == listing("two.png")  # another folder: its own entry
        assert fp.folder_digest(one, contents=True) == listing_with_contents(one, "one.png")  # its own entry too
        assert walked == ["one", "two", "one"]
        with fp.listings_cached():  # a pass inside a pass (a sweep's plan inside its run) shares the listings
            assert fp.folder_digest(one) == first
        (one / "added.png").write_bytes(b"y")
        assert fp.folder_digest(one) == first  # still the outer pass's listing, after the inner one ended
        assert walked == ["one", "two", "one"]
    assert fp.folder_digest(one) == listing("added.png", "one.png")  # outside a pass: listed afresh, each time
    assert fp.folder_digest(one) == listing("added.png", "one.png")
    assert walked == ["one", "two", "one", "one", "one"]


def test_demo_manifest_is_the_generators_identity_or_none(tmp_path):
    from clipstudy.engine.fingerprint import demo_manifest

    data = hand_made_data(tmp_path / "data")
    assert demo_manifest(str(data)) == {"generator_version": 2, "parameters": {"seed": 0}, "digest": "d0"}
    (data / "manifest.json").write_text('{"digest": "d1", "note": "caf\u00e9"}', encoding="utf-8")
    assert demo_manifest(str(data)) == {"generator_version": None, "parameters": None, "digest": "d1"}
    (data / "manifest.json").write_text("{not json")
    assert demo_manifest(str(data)) is None
    (data / "manifest.json").unlink()
    assert demo_manifest(str(data)) is None
    assert demo_manifest(str(tmp_path / "absent")) is None


@QUICK
def test_the_data_part_digests_each_file_the_run_reads(tmp_path):
    from clipstudy.engine.fingerprint import data_fingerprint

    data = hand_made_data(tmp_path / "data")
    config = make_config("smoke", data=str(data))
    found = data_fingerprint(config)
    assert found == expected_data(data) and list(found) == list(expected_data(data))  # the manifest first
    # a tuning trial (no test sets): the test split's files are not part of it
    trial = data_fingerprint(make_config("smoke", data=str(data), evaluate_test=False))
    assert trial == expected_data(data, evaluate_test=False)
    # a folder without a manifest: no manifest entry
    (data / "manifest.json").unlink()
    assert "demo_manifest" not in data_fingerprint(config)
    # explicit paths only: an unset file is "", not a digest; no zero-shot folder, no tokenizer: no entry
    alone = make_config("paper", train_ann=str(data / "train.json"))
    assert data_fingerprint(alone) == {
        "train_ann": sha(HAND_MADE["train.json"]),
        "retrieval_ann": "",
        "val_retrieval_ann": "",
    }
    assert data_fingerprint(make_config("paper")) == {"train_ann": "", "retrieval_ann": "", "val_retrieval_ann": ""}
    # a file named but absent is "missing", so it differs from an unset one
    gone = make_config("paper", train_ann=str(data / "gone.json"), val_zeroshot_images=str(data / "gone"))
    assert data_fingerprint(gone) == {
        "train_ann": "missing",
        "retrieval_ann": "",
        "val_retrieval_ann": "",
        "val_zeroshot_listing": "missing",
        "val_zeroshot_classnames": "missing",
    }


EDITED_LISTINGS = {
    "zeroshot_listing": listing("classnames.json", "red_circle/0.png", "red_circle/1.png", "red_circle/2.png"),
    "val_zeroshot_listing": listing("blue_cross/0.png", "blue_cross/1.png", "classnames.json"),
}


@QUICK
@pytest.mark.parametrize(
    "name, content, key",
    [
        ("train.json", b'[{"image": "a.png", "caption": "a red disc"}]', "train_ann"),
        ("retrieval.json", b'[{"image": "b.png", "caption": ["a blue box"]}]', "retrieval_ann"),
        ("val_retrieval.json", b'[{"image": "c.png", "caption": ["a green plus"]}]', "val_retrieval_ann"),
        ("zeroshot/red_circle/2.png", b"png 2", "zeroshot_listing"),
        ("val_zeroshot/blue_cross/1.png", b"val png 1", "val_zeroshot_listing"),
        # the class names: same file name, other names of the classes (the prompts change, the listing does not)
        ("zeroshot/classnames.json", b'{"classnames": {"red_circle": "crimson disc"}}', "zeroshot_classnames"),
        ("val_zeroshot/classnames.json", b'{"classnames": {"blue_cross": "cobalt plus"}}', "val_zeroshot_classnames"),
        # the tokenizer: same file names, other vocabulary (its contents count, not only its listing)
        ("tokenizer/vocab.txt", b"[PAD]\n[UNK]\nblue\n", "tokenizer"),
    ],
)
def test_each_data_input_changes_the_fingerprint_and_is_named(tmp_path, name, content, key):
    from clipstudy.engine.fingerprint import describe_change

    data = hand_made_data(tmp_path / "data")
    config = make_config("smoke", data=str(data))
    before = fingerprint(config)
    old = expected_data(data)[key]
    assert before["data"][key] == old
    (data / name).write_bytes(content)
    after = fingerprint(config)
    if key in EDITED_LISTINGS:
        new = EDITED_LISTINGS[key]
    elif key == "tokenizer":
        new = sha(b"tokenizer_config.json\0" + sha(b"{}").encode() + b"vocab.txt\0" + sha(content).encode())
    else:
        new = sha(content)
    assert after["config"] == before["config"] and after["digest"] != before["digest"]
    assert after["data"] == {**before["data"], key: new}  # that entry only
    assert differences(before, after) == [f"data.{key} {old[:8]} -> {new[:8]}"]
    assert describe_change(before, after) == f"data.{key} {old[:8]} -> {new[:8]}"


@QUICK
def test_a_regenerated_data_set_is_named_by_its_manifest(tmp_path):
    from clipstudy.engine.fingerprint import describe_change

    data = hand_made_data(tmp_path / "data")
    config = make_config("smoke", data=str(data))
    before = fingerprint(config)
    (data / "manifest.json").write_bytes(b'{"generator_version": 2, "parameters": {"seed": 1}, "digest": "d1"}')
    after = fingerprint(config)
    assert (
        describe_change(before, after)
        == "data.demo_manifest.parameters.seed 0 -> 1, data.demo_manifest.digest d0 -> d1"
    )


# field -> (another value, how describe_change names the change; None: several entries change, the field first)
OTHER_VALUES = {
    "profile": ("demo", "profile smoke -> demo"),
    "optimizer": ("sgd", "optimizer adamw -> sgd"),
    "label": ("adam-x", 'label "" -> adam-x'),
    "loss": ("sogclr", "loss clip -> sogclr"),
    "seed": (1, "seed 0 -> 1"),
    "limit_train": (128, "limit_train 256 -> 128"),
    "max_words": (20, "max_words 30 -> 20"),
    "max_length": (12, "max_length 16 -> 12"),
    "image_size": (24, "image_size 32 -> 24"),
    "crop_scale_min": (0.9, "crop_scale_min 0.85 -> 0.9"),
    "hflip": (True, "hflip False -> True"),
    "augment": ("albef", "augment none -> albef"),
    "zeroshot_transform": ("original", "zeroshot_transform clip -> original"),
    "image_encoder": ("resnet50", "image_encoder small_resnet -> resnet50"),
    "text_encoder": ("distilbert", None),  # the data set's tokenizer is no longer read
    "pretrained": (True, "pretrained False -> True"),
    "image_weights": ("timm-a1", "image_weights torchvision -> timm-a1"),
    "pretrain": ({"images": 48}, "pretrain.images none -> 48"),
    "text_pooling": ("first", "text_pooling mean -> first"),
    "embed_dim": (64, "embed_dim 32 -> 64"),
    "small_resnet_widths": ([8, 16, 64], "small_resnet_widths [8, 16, 32] -> [8, 16, 64]"),
    "small_resnet_blocks": ([1, 2, 1], "small_resnet_blocks [1, 1, 1] -> [1, 2, 1]"),
    "small_resnet_norm": ("group", "small_resnet_norm batch -> group"),
    "text_dim": (64, "text_dim 32 -> 64"),
    "text_layers": (2, "text_layers 1 -> 2"),
    "temperature": (0.02, "temperature 0.01 -> 0.02"),
    "loss_params": ({"gamma": 0.5}, "loss_params.gamma none -> 0.5"),
    "lr": (0.05, "lr 0.002 -> 0.05"),
    "weight_decay": (0.1, "weight_decay 0.02 -> 0.1"),
    "optimizer_params": ({"momentum": 0.5}, "optimizer_params.momentum none -> 0.5"),
    "epochs": (3, "epochs 2 -> 3"),
    "batch_size": (8, "batch_size 16 -> 8"),
    "warmup_steps": (5, "warmup_steps 2 -> 5"),
    "lr_schedule": ("original", "lr_schedule smooth -> original"),
    "warmup_lr": (1e-4, "warmup_lr 1e-05 -> 0.0001"),
    "min_lr": (1e-5, "min_lr 1e-06 -> 1e-05"),
    "grad_clip": (1.0, "grad_clip 0.0 -> 1.0"),
    "amp": ("bf16", "amp auto -> bf16"),
    "eval_every": (2, "eval_every 1 -> 2"),
    "evaluate_test": (False, None),  # the test sets' digests leave the fingerprint too
    "eval_batch_size": (32, "eval_batch_size 64 -> 32"),
    "deterministic": (False, "deterministic True -> False"),
}
NEUTRAL_VALUES = {
    "out": "/elsewhere",
    "num_workers": 3,
    "threads": 2,
    "device": "cpu",
    "log_every": 7,
    "cache_images": False,
    "keep_checkpoints": 5,
    "max_steps": 3,
    "tensorboard": False,
}


def test_every_configuration_field_is_either_an_input_or_neutral():
    from clipstudy.engine.config import FIELDS, PATH_FIELDS

    assert set(OTHER_VALUES) | set(NEUTRAL_VALUES) | set(PATH_FIELDS) == set(FIELDS)
    assert not set(OTHER_VALUES) & set(NEUTRAL_VALUES)


@QUICK
@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_each_configuration_field_changes_the_fingerprint_and_is_named(tmp_path, name):
    import dataclasses

    from clipstudy.engine.fingerprint import describe_change

    data = hand_made_data(tmp_path / "data")
    base = make_config("smoke", data=str(data))
    value, shown = OTHER_VALUES[name]
    before, after = fingerprint(base), fingerprint(dataclasses.replace(base, **{name: value}))
    assert after["digest"] != before["digest"] and after["config"][name] == value
    change = describe_change(before, after)
    assert change == shown if shown else change.startswith(f"{name} {getattr(base, name)} -> {value}, ")


@QUICK
@pytest.mark.parametrize("name", sorted(NEUTRAL_VALUES))
def test_where_and_how_fast_a_run_executes_leaves_the_fingerprint_alone(tmp_path, name):
    import dataclasses

    from clipstudy.engine.fingerprint import describe_change

    data = hand_made_data(tmp_path / "data")
    base = make_config("smoke", data=str(data))
    before, after = fingerprint(base), fingerprint(dataclasses.replace(base, **{name: NEUTRAL_VALUES[name]}))
    assert after == before and describe_change(before, after) is None and name not in after["config"]


@QUICK
def test_the_fingerprint_is_the_digest_of_the_resolved_configuration_and_the_data(tmp_path):
    import dataclasses

    from clipstudy.engine.config import FIELDS

    data = hand_made_data(tmp_path / "data")
    config = make_config("smoke", data=str(data))
    found = fingerprint(config)
    assert list(found) == ["digest", "config", "data"] and found["data"] == expected_data(data)
    # the data paths are resolved ("data" expanded); "data" and "out" themselves, and the neutral fields, are out
    assert set(found["config"]) == set(FIELDS) - set(NEUTRAL_VALUES) - {"data"}
    assert (found["config"]["train_ann"], found["config"]["tokenizer"]) == (
        str(data / "train.json"),
        str(data / "tokenizer"),
    )
    # canonical JSON (sorted keys, no spaces) of both parts
    canonical = json.dumps({"config": found["config"], "data": found["data"]}, sort_keys=True, separators=(",", ":"))
    assert found["digest"] == sha(canonical.encode())
    # another folder with the same bytes: the same data part, other paths
    other = make_config("smoke", data=str(hand_made_data(tmp_path / "copy")))
    moved = fingerprint(other)
    assert moved["data"] == found["data"] and moved["digest"] != found["digest"]
    assert differences(found, moved)[0] == f"train_ann {data}/train.json -> {tmp_path}/copy/train.json"
    assert fingerprint(dataclasses.replace(config, train_ann=str(data / "val_retrieval.json")))["data"][
        "train_ann"
    ] == (sha(HAND_MADE["val_retrieval.json"]))


def test_digest_of_hashes_canonical_json():
    from clipstudy.engine.fingerprint import digest_of

    body = {"b": 1, "a": {"d": [1, 2], "c": "x"}}  # keys out of order, nested
    assert digest_of(body) == sha(b'{"a":{"c":"x","d":[1,2]},"b":1}')


def test_flatten_names_nested_entries_by_their_path():
    from clipstudy.engine.fingerprint import _flatten

    assert _flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3, "f": {}}) == {"a.b.c": 1, "a.d": 2, "e": 3}
    assert _flatten({1: {2: "x"}}) == {"1.2": "x"}
    assert _flatten(5) == {"": 5}
    assert _flatten({"a": [1, {"b": 2}]}) == {"a": [1, {"b": 2}]}  # lists are values


def test_differences_show_values_briefly():
    digest_a, digest_b = "a" * 64, "0123456789abcdef" * 4
    old = {"config": {"lr": 0.1, "label": "", "hflip": False, "pretrain": {}}, "data": {"train_ann": digest_a}}
    new = {
        "config": {"lr": 0.2, "label": "x" * 64, "hflip": True, "pretrain": {"images": 48}},
        "data": {"train_ann": digest_b, "note": "b" * 63, "count": 64, "tokenizer": None},
    }
    assert differences(old, new) == [
        "lr 0.1 -> 0.2",
        f'label "" -> {"x" * 64}',  # a long configuration value is shown whole
        "hflip False -> True",
        "data.train_ann aaaaaaaa -> 01234567",  # a digest: its first 8 characters
        "pretrain.images none -> 48",  # entries only in the new one come after those of the old
        f"data.note none -> {'b' * 63}",  # not a digest: whole
        "data.count none -> 64",
    ]
    assert differences(old, old) == []
    # a part missing on one side counts as empty
    assert differences({"config": {"lr": 1}}, {"config": {"lr": 2}, "data": {"x": "y"}}) == [
        "lr 1 -> 2",
        "data.x none -> y",
    ]
    assert differences({"data": {"x": "y"}}, {"config": {"lr": 2}}) == ["data.x y -> none", "lr none -> 2"]


def test_describe_change_says_what_changed_in_a_few_words():
    from clipstudy.engine.fingerprint import describe_change

    def recorded(digest, **config):
        return {"digest": digest, "config": config, "data": {}}

    new = recorded("new", a=1, b=2, c=3, d=4, e=5, f=6)
    assert describe_change(None, new) == "no fingerprint recorded (run made by an older clipstudy)"
    assert describe_change({}, new) == "no fingerprint recorded (run made by an older clipstudy)"
    assert describe_change({"config": {}}, new) == "no fingerprint recorded (run made by an older clipstudy)"
    assert describe_change(recorded("new", a=0), new) is None  # the digests decide
    assert describe_change(recorded("old", a=1, b=2, c=3, d=4, e=5, f=6), new) == "fingerprint differs"
    assert describe_change(recorded("old", a=0, b=2, c=3, d=4, e=5, f=6), new) == "a 0 -> 1"
    four = recorded("old", a=0, b=0, c=0, d=0, e=5, f=6)
    assert describe_change(four, new) == "a 0 -> 1, b 0 -> 2, c 0 -> 3, d 0 -> 4"
    five = recorded("old", a=0, b=0, c=0, d=0, e=0, f=6)
    assert describe_change(five, new) == "a 0 -> 1, b 0 -> 2, c 0 -> 3, d 0 -> 4, and 1 more"
    six = recorded("old", a=0, b=0, c=0, d=0, e=0, f=0)
    assert describe_change(six, new) == "a 0 -> 1, b 0 -> 2, c 0 -> 3, d 0 -> 4, and 2 more"
    # a record without its data part (or config part) names each field the other side has, one by one
    partial = {"digest": "old", "config": {"a": 1}}
    data = {"digest": "new", "config": {"a": 1}, "data": {"train": "x", "tokenizer": "y"}}
    assert describe_change(partial, data) == "data.train none -> x, data.tokenizer none -> y"
    assert describe_change(data, partial) == "data.train x -> none, data.tokenizer y -> none"
    assert describe_change({"digest": "old", "data": {}}, recorded("new", a=1)) == "a none -> 1"
