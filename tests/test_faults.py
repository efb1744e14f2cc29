"""Faults a long sweep meets on a shared machine: nothing finished is lost, every error is clear.

Killed processes, damaged checkpoints, a full or unwritable disk, dirty data,
wrong parameters, two sweeps on one folder, names that try to leave the runs
folder. Fast tests run with ``make test``; the end-to-end ones that start
sweeps are marked ``faults`` (``make test-faults``).

Covered elsewhere: configuration validation (test_config.py); checkpoint
digests, truncation, unsafe pickles and a lock left by a killed process
(test_checkpoint.py); SIGTERM, SIGINT and ``kill -9`` of one ``train`` run
(test_resume.py), divergence of one run (test_train.py); sweep skip / resume / continue after a failure and
a wrongly typed papermill parameter (test_sweep.py).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_DEMO, assert_same_weights

from clipstudy.__main__ import main as clipstudy_main
from clipstudy.data.check import check_data
from clipstudy.data.datasets import DataError, RetrievalSet, TrainPairs, eval_transform
from clipstudy.data.zeroshot import ZeroShotSet
from clipstudy.engine.checkpoint import CheckpointWriteError, checkpoint_paths, load_latest, load_verified
from clipstudy.engine.config import ConfigError, cell_name, make_config
from clipstudy.engine.train import train
from clipstudy.fileio import SWEEP_LOCK_NAME, is_locked
from clipstudy.study.sweep import plan_cells

REPO_ROOT = Path(__file__).resolve().parent.parent
# Fields that legitimately differ between two runs of the same cell.
TIMING = {"wall_time_s", "train_samples_per_s", "peak_memory_mb", "eval_time", "git_commit"}
SMOKE_STEPS_PER_EPOCH = TINY_DEMO["train_size"] // 16  # smoke batch size 16


def smoke(data, out, **kw):
    kw.setdefault("threads", 1)
    return make_config("smoke", data=str(data), out=str(out), **kw)


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING}


def read_metrics(run: Path) -> dict:
    return strict_json(run / "metrics.json")


def error_line(stderr: str) -> str:
    """The one ``error: ...`` line a command printed."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def strict_json(path: Path):
    """Parse as standard JSON: NaN / Infinity (which Python writes by default) are refused."""

    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def newest_state(run: Path) -> dict:
    state, _, _ = load_latest(Path(run) / "checkpoints")
    assert state is not None, f"no valid checkpoint in {run}"
    return state


def assert_same_history(run: Path, reference: Path) -> None:
    got, want = pd.read_csv(run / "history.csv"), pd.read_csv(reference / "history.csv")
    assert got["step"].tolist() == want["step"].tolist()
    pd.testing.assert_series_equal(got["loss"], want["loss"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, demo_data_dir):
    """An uninterrupted smoke run (adamw + sogclr, 3 epochs): the numbers every recovery must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    metrics = train(smoke(demo_data_dir, out, loss="sogclr", epochs=3), progress=False)
    assert metrics["status"] == "completed"
    assert metrics["global_step"] == 3 * SMOKE_STEPS_PER_EPOCH
    return out


def reference_config(demo_data_dir, out):
    return smoke(demo_data_dir, out, loss="sogclr", epochs=3)


# ============================================================ damaged checkpoints
@pytest.mark.parametrize("damage", ["truncate", "flip", "no_digest"])
def test_damaged_latest_checkpoint_is_skipped_with_a_warning(reference_run, demo_data_dir, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    newest, previous = checkpoint_paths(run / "checkpoints")
    assert (newest.name, previous.name) == (
        f"ckpt-{3 * SMOKE_STEPS_PER_EPOCH:08d}.pt",
        f"ckpt-{2 * SMOKE_STEPS_PER_EPOCH:08d}.pt",
    )
    data = newest.read_bytes()
    if damage == "truncate":  # e.g. a copy or a sync cut short
        newest.write_bytes(data[: len(data) // 3])
    elif damage == "flip":  # same size, one byte changed in the middle of the tensors
        middle = len(data) // 2
        newest.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
    else:  # the digest was never written
        newest.with_name(newest.name + ".sha256").unlink()

    metrics = train(reference_config(demo_data_dir, run), progress=False)
    err = capsys.readouterr().err
    assert re.search(rf"WARNING: skipping damaged checkpoint: \S*{re.escape(newest.name)}", err), err
    assert re.search(rf"resumed from \S*{re.escape(previous.name)}", err), err
    assert comparable(metrics) == comparable(read_metrics(reference_run))
    assert comparable(read_metrics(run)) == comparable(metrics)
    assert_same_weights(load_verified(newest), newest_state(reference_run))  # rewritten, valid again
    assert_same_history(run, reference_run)


def test_temporaries_of_a_killed_write_are_removed_on_rerun(reference_run, demo_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    newest, _ = checkpoint_paths(run / "checkpoints")
    newest.with_name(newest.name + ".sha256").unlink()  # killed between the checkpoint and its digest
    half_written = run / "checkpoints" / f".{newest.name}.k9x2.tmp"
    half_written.write_bytes(newest.read_bytes()[:1000])  # and a later write killed mid-file
    stale_metrics = run / ".metrics.json.ab12.tmp"
    stale_metrics.write_text("{")
    keep = run / "checkpoints" / "notes.tmp"  # not ours (no leading dot): left alone
    keep.write_text("user file")

    metrics = train(reference_config(demo_data_dir, run), progress=False)
    err = capsys.readouterr().err
    assert f"removed {half_written.name}" in err and f"removed {stale_metrics.name}" in err
    assert not half_written.exists() and not stale_metrics.exists() and keep.read_text() == "user file"
    assert comparable(metrics) == comparable(read_metrics(reference_run))


def test_every_checkpoint_damaged_trains_from_scratch(reference_run, demo_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    (run / "metrics.json").unlink()
    for path in checkpoint_paths(run / "checkpoints"):
        path.write_bytes(b"\0" * 64)
    metrics = train(reference_config(demo_data_dir, run), progress=False)
    err = capsys.readouterr().err
    assert len(re.findall(r"^WARNING: skipping damaged checkpoint", err, re.M)) == 2 and "resumed from" not in err
    assert comparable(metrics) == comparable(read_metrics(reference_run))
    assert_same_weights(newest_state(run), newest_state(reference_run))


def test_result_files_are_readable_like_any_file_the_user_writes(reference_run):
    """Results written atomically (via a temporary file) keep the usual permissions, not owner-only ones,
    so a shared runs folder stays readable."""
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [reference_run / name for name in ("metrics.json", "config.json", "history.csv", "epochs.csv")]
    files += [p for p in (reference_run / "checkpoints").iterdir()]
    assert len(files) == 8
    for path in files:
        assert path.stat().st_mode & 0o777 == expected, path


# ============================================================ full or unwritable disk
def failing(function: str, target_prefix: str, exc: OSError):
    """A stand-in for ``os.fsync`` or ``os.replace`` that raises ``exc`` for files whose name starts with
    ``target_prefix`` (a checkpoint's temporary file) and behaves normally otherwise; counts its faults."""
    real = getattr(os, function)
    calls = {"n": 0}

    def name_of(arg) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{arg}") if function == "fsync" else str(arg))

    def fake(arg, *rest, **kw):
        if name_of(arg).startswith(target_prefix):
            calls["n"] += 1
            raise exc
        return real(arg, *rest, **kw)

    return fake, calls


@pytest.mark.parametrize(
    "where, error",
    [
        # the disk fills while the checkpoint itself is flushed
        pytest.param("fsync", errno.ENOSPC, id="enospc-checkpoint"),
        # the checkpoint is in place, then its digest cannot be written
        pytest.param("fsync-digest", errno.ENOSPC, id="enospc-digest"),
        # the folder lost its write permission: the rename fails
        pytest.param("replace", errno.EACCES, id="eacces-rename"),
    ],
)
def test_full_disk_at_a_checkpoint_keeps_the_previous_one(
    reference_run, demo_data_dir, tmp_path, monkeypatch, capsys, where, error
):
    run = tmp_path / "run"
    second = f"ckpt-{2 * SMOKE_STEPS_PER_EPOCH:08d}.pt"
    first = f"ckpt-{SMOKE_STEPS_PER_EPOCH:08d}.pt"
    prefix = f".{second}." + ("sha256." if where == "fsync-digest" else "")  # its temporary file
    function = "replace" if where == "replace" else "fsync"
    fake, calls = failing(function, prefix, OSError(error, os.strerror(error)))
    monkeypatch.setattr(os, function, fake)

    with pytest.raises(CheckpointWriteError) as caught:
        train(reference_config(demo_data_dir, run), progress=False)
    monkeypatch.undo()
    assert calls["n"] == 1
    message = str(caught.value)
    assert str(run / "checkpoints" / second) in message
    assert os.strerror(error) in message and "rerun the same command" in message
    # the previous checkpoint is intact; nothing half-written or digest-less is left behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first, first + ".sha256"]
    assert load_verified(run / "checkpoints" / first)["global_step"] == SMOKE_STEPS_PER_EPOCH
    failed = read_metrics(run)
    assert failed["status"] == "failed" and second in failed["error"]

    # space freed: the same command resumes from the first checkpoint and ends like an uninterrupted run
    capsys.readouterr()
    metrics = train(reference_config(demo_data_dir, run), progress=False)
    assert re.search(
        rf"resumed from \S*{re.escape(first)} \(epoch 2, batch 0, step {SMOKE_STEPS_PER_EPOCH}\)",
        capsys.readouterr().err,
    )
    assert len(strict_json(run / "config.json")["resumes"]) == 1
    assert comparable(metrics) == comparable(read_metrics(reference_run))
    assert_same_weights(newest_state(run), newest_state(reference_run))
    assert_same_history(run, reference_run)


@pytest.mark.parametrize(
    "name, resumes_from",
    [
        ("config.json", None),  # at the start: nothing trained yet
        ("history.csv", SMOKE_STEPS_PER_EPOCH),  # just after the first checkpoint
        ("epochs.csv", SMOKE_STEPS_PER_EPOCH),
        ("metrics.json", 3 * SMOKE_STEPS_PER_EPOCH),  # at the very end
    ],
)
def test_full_disk_while_writing_a_result_file(
    reference_run, demo_data_dir, tmp_path, monkeypatch, capsys, name, resumes_from
):
    """The disk fills while a result file is flushed: the run stops with the error, leaves no half-written
    file, and once space is freed the same command resumes and ends like an uninterrupted run."""
    run = tmp_path / "run"
    fake, calls = failing("fsync", f".{name}.", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(os, "fsync", fake)
    with pytest.raises(OSError) as caught:
        train(reference_config(demo_data_dir, run), progress=False)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and calls["n"] >= 1
    assert not (run / name).exists()  # never a partial file
    assert not [p for p in run.rglob("*.tmp")]  # nor a leftover temporary
    if name != "metrics.json":
        failed = read_metrics(run)
        assert failed["status"] == "failed" and "No space left on device" in failed["error"]
    saved = checkpoint_paths(run / "checkpoints")
    assert [int(p.name[5:13]) for p in saved[:1]] == ([resumes_from] if resumes_from else [])

    capsys.readouterr()
    metrics = train(reference_config(demo_data_dir, run), progress=False)
    err = capsys.readouterr().err
    if resumes_from:
        assert re.search(rf"resumed from \S*ckpt-{resumes_from:08d}\.pt \(.*step {resumes_from}\)", err), err
    else:
        assert "resumed from" not in err
    assert comparable(metrics) == comparable(read_metrics(reference_run))
    assert_same_weights(newest_state(run), newest_state(reference_run))
    assert_same_history(run, reference_run)
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "epochs.csv").drop(columns="eval_time"),
        pd.read_csv(reference_run / "epochs.csv").drop(columns="eval_time"),
    )


def test_checkpoint_write_error_through_the_cli(demo_data_dir, tmp_path, monkeypatch, capsys):
    fake, _ = failing("fsync", ".ckpt-", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(os, "fsync", fake)
    code = clipstudy_main(
        [
            "train",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 1 and "Traceback" not in err
    assert line.startswith(f"error: cannot write checkpoint {tmp_path / 'run' / 'checkpoints'}")
    assert "No space left on device" in line and "Free disk space" in line


def test_run_directory_that_cannot_be_created(demo_data_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker / "run", blocker):
        with pytest.raises(ConfigError, match="'out'") as caught:
            train(smoke(demo_data_dir, out), progress=False)
        assert str(out) in str(caught.value) and "choose a folder you can write to" in str(caught.value)
    code = clipstudy_main(
        ["train", "--profile", "smoke", "--data", str(demo_data_dir), "--out", str(blocker / "run"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(blocker / "run") in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"
    # the sweep checks its runs folder before starting any cell
    code = clipstudy_main(
        [
            "sweep",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(blocker / "runs"),
            "--optimizers",
            "adamw",
            "--losses",
            "clip",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(blocker / "runs") in err and "--runs" in err


# ============================================================ dirty data
def copy_data(demo_data_dir, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(demo_data_dir, data)
    return data


def test_training_set_without_a_readable_image(demo_data_dir, tmp_path, capsys):
    data = copy_data(demo_data_dir, tmp_path)
    entries = json.loads((data / "train.json").read_text())
    for k, entry in enumerate(entries):
        path = data / "images" / entry["image"]
        if k % 2:
            path.unlink()  # missing
        else:
            path.write_bytes(path.read_bytes()[:20])  # truncated
    run = tmp_path / "run"
    with pytest.raises(DataError) as caught:
        train(smoke(data, run, epochs=3), progress=False)
    message = str(caught.value)
    # found at start-up, before any training step
    assert message.startswith(f"{data / 'train.json'}: none of the {len(entries)} training images can be read")
    assert "python -m clipstudy check-data" in message
    failed = read_metrics(run)
    assert failed["status"] == "failed" and "check-data" in failed["error"]
    assert checkpoint_paths(run / "checkpoints") == []  # nothing trained, nothing saved

    assert (
        clipstudy_main(["check-data", "--train-ann", str(data / "train.json"), "--train-images", str(data / "images")])
        == 1
    )
    out = capsys.readouterr().out
    assert "NOT USABLE" in out and f"unreadable: {len(entries)}" in out

    code = clipstudy_main(
        [
            "train",
            "--profile",
            "smoke",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "cli"),
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert error_line(err).startswith(f"error: {data / 'train.json'}: none of the")


@pytest.mark.parametrize("which", ["retrieval", "zeroshot"])
def test_evaluation_set_without_a_readable_image_fails_at_start(demo_data_dir, tmp_path, which):
    data = copy_data(demo_data_dir, tmp_path)
    if which == "retrieval":
        source = data / "retrieval.json"
        for entry in json.loads(source.read_text()):
            (data / "images" / entry["image"]).write_bytes(b"not an image")
        expected = f"{source}: none of the"
    else:
        source = data / "zeroshot"
        for image in source.rglob("*.*"):
            if image.suffix.lower() in (".png", ".jpg", ".jpeg"):
                image.write_bytes(b"")
        expected = f"{source}: none of the"
    run = tmp_path / "run"
    with pytest.raises(DataError, match="none of the") as caught:
        train(smoke(data, run, epochs=3), progress=False)
    assert str(caught.value).startswith(expected) and "check-data" in str(caught.value)
    assert checkpoint_paths(run / "checkpoints") == []  # failed before the first step


def test_dirty_but_usable_data_trains_and_is_reported(demo_data_dir, tmp_path, caplog, capsys):
    data = copy_data(demo_data_dir, tmp_path)
    entries = json.loads((data / "train.json").read_text())
    entries[3]["caption"] = "!!!"  # cleans to nothing
    entries[10]["caption"] = ""  # empty
    entries[11]["caption"] = " -- ?"  # cleans to nothing
    entries[20]["image_id"] = entries[21]["image_id"]  # an id on two different images
    entries.append(dict(entries[5], caption="another caption of the same image"))  # one image, two captions
    entries.append(dict(entries[6]))  # an exact repeat of a pair
    (data / "train.json").write_text(json.dumps(entries))
    (data / "zeroshot" / "zz_empty").mkdir()  # a class with no image
    names = json.loads((data / "zeroshot" / "classnames.json").read_text())
    names["classnames"]["zz_empty"] = "green diamond"
    (data / "zeroshot" / "classnames.json").write_text(json.dumps(names))

    with caplog.at_level("WARNING", logger="clipstudy.data.datasets"):
        pairs = TrainPairs(data / "train.json", data / "images", eval_transform(8))
    assert pairs.empty_captions == 3
    assert f"3 of {len(entries)} captions are empty after cleaning (caption numbers 3, 10, 11)" in caplog.text

    report = check_data(data=str(data))
    assert report["ok"] is True
    assert report["train"]["captions"]["empty_after_cleaning"] == 3
    assert report["train"]["duplicates"] == {
        "repeated_image_ids": 3,
        "entries_with_repeated_ids": 6,
        "repeated_id_examples": [entries[5]["image_id"], entries[6]["image_id"], entries[21]["image_id"]],
        "ids_on_different_images": 1,
        "different_images_examples": [entries[21]["image_id"]],
        "repeated_pairs": 1,
    }
    assert report["zeroshot"]["empty_classes"] == ["zz_empty"]
    assert report["zeroshot"]["classes"] == TINY_DEMO["zeroshot_classes"] + 1
    assert ZeroShotSet(data / "zeroshot", eval_transform(8)).classnames[-1] == "green diamond"  # in the classifier

    metrics = train(smoke(data, tmp_path / "run", epochs=1), progress=False)
    assert metrics["status"] == "completed"
    assert metrics["global_step"] == len(entries) // 16
    # zero-shot scored every image against all classes, the empty one included
    assert metrics["zeroshot_n_images"] == TINY_DEMO["zeroshot_classes"] * TINY_DEMO["zeroshot_per_class"]
    # with the empty class in the classifier, top-1 is a count of correct images out of 12
    correct = metrics["zeroshot_top1"] * metrics["zeroshot_n_images"] / 100
    assert correct == pytest.approx(round(correct))
    from clipstudy.cli.commands import evaluate_main

    assert evaluate_main(["--run", str(tmp_path / "run"), "--json"]) == 0  # same data, same classifier
    rescored = json.loads(capsys.readouterr().out)
    assert rescored["zeroshot_top1"] == pytest.approx(metrics["zeroshot_top1"])
    assert rescored["zeroshot_n_images"] == metrics["zeroshot_n_images"]
    assert read_metrics(tmp_path / "run") == json.loads(json.dumps(metrics))


def test_unreadable_training_images_are_counted_each_epoch_and_warned_once(demo_data_dir, tmp_path, caplog):
    data = copy_data(demo_data_dir, tmp_path)
    entries = json.loads((data / "train.json").read_text())
    bad = [entries[k]["image"] for k in (1, 17, 40)]
    (data / "images" / bad[0]).unlink()  # missing
    (data / "images" / bad[1]).write_bytes(b"")  # empty
    (data / "images" / bad[2]).write_bytes(b"GIF89a broken")  # not an image
    epochs = 2
    with caplog.at_level("WARNING", logger="clipstudy.data.datasets"):
        metrics = train(smoke(data, tmp_path / "run", epochs=epochs), progress=False)
    assert metrics["status"] == "completed"
    # every epoch visits every training pair once: each bad file is skipped once per epoch
    assert metrics["skipped_images"] == len(bad) * epochs == read_metrics(tmp_path / "run")["skipped_images"]
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping unreadable image")]
    assert sorted(next(name for name in bad if name in w) for w in warned) == sorted(bad)  # one per file


def test_a_run_directory_in_use_is_refused_untouched(demo_data_dir, tmp_path, capsys):
    from clipstudy.fileio import CellBusy, cell_lock

    run = tmp_path / "run"
    run.mkdir()
    with cell_lock(run):
        with pytest.raises(CellBusy, match=f"{re.escape(str(run))} is being trained by another process"):
            train(smoke(demo_data_dir, run, epochs=1), progress=False)
        code = clipstudy_main(
            [
                "train",
                "--profile",
                "smoke",
                "--data",
                str(demo_data_dir),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        line = error_line(capsys.readouterr().err)
    assert code == 1 and "wait for it or use another output directory" in line
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints"]  # no result, no failure record
    assert list((run / "checkpoints").iterdir()) == []


def test_evaluate_command_reproduces_the_final_evaluation(reference_run, capsys):
    from clipstudy.cli.commands import evaluate_main

    assert evaluate_main(["--run", str(reference_run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    final = read_metrics(reference_run)
    assert scores["global_step"] == final["global_step"] == 3 * SMOKE_STEPS_PER_EPOCH
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r10", "zeroshot_top1", "zeroshot_top5", "average"):
        assert scores[key] == pytest.approx(final[key], abs=1e-9), key
    first = checkpoint_paths(reference_run / "checkpoints")[-1]  # an older checkpoint: that epoch's scores
    argv = ["--run", str(reference_run), "--checkpoint", str(first), "--split", "validation", "--json"]
    assert evaluate_main(argv) == 0
    older = json.loads(capsys.readouterr().out)
    row = pd.read_csv(reference_run / "epochs.csv").set_index("step").loc[older["global_step"]]
    assert older["global_step"] == 2 * SMOKE_STEPS_PER_EPOCH
    assert older["val_txt_r1"] == pytest.approx(row["val_txt_r1"])
    assert older["val_zeroshot_top1"] == pytest.approx(row["val_zeroshot_top1"])


def test_check_data_text_report_names_the_problems(demo_data_dir, tmp_path, capsys):
    data = copy_data(demo_data_dir, tmp_path)
    entries = json.loads((data / "train.json").read_text())
    entries[0]["caption"] = "?!"
    entries[1]["image_id"] = entries[2]["image_id"]
    (data / "train.json").write_text(json.dumps(entries))
    assert clipstudy_main(["check-data", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "1 caption(s) are empty after cleaning" in out
    assert f"1 image id(s) name different image files, e.g. {entries[2]['image_id']}" in out


@pytest.mark.parametrize("bad_path", ["../secret.png", "images/../../secret.png", "/etc/passwd"])
def test_image_paths_outside_the_image_root_are_rejected(tmp_path, capsys, bad_path):
    images = tmp_path / "images"
    images.mkdir()
    ok = {"image": "a/../a.png", "caption": "fine: stays inside", "image_id": 0}
    train_ann = tmp_path / "train.json"
    train_ann.write_text(json.dumps([ok, {"image": bad_path, "caption": "x", "image_id": 1}]))
    with pytest.raises(DataError) as caught:
        TrainPairs(train_ann, images, eval_transform(8))
    message = str(caught.value)
    assert str(train_ann) in message and "entry 1 " in message and repr(bad_path) in message
    assert "outside the image root" in message
    retrieval_ann = tmp_path / "retrieval.json"
    retrieval_ann.write_text(json.dumps([{"image": bad_path, "caption": ["x"]}]))
    with pytest.raises(DataError, match="entry 0 .*outside the image root"):
        RetrievalSet(retrieval_ann, images, eval_transform(8))
    assert clipstudy_main(["check-data", "--train-ann", str(train_ann), "--train-images", str(images)]) == 2
    assert repr(bad_path) in capsys.readouterr().err


def test_image_path_climbing_out_is_rejected_by_train(demo_data_dir, tmp_path, capsys):
    data = copy_data(demo_data_dir, tmp_path)
    entries = json.loads((data / "train.json").read_text())
    entries[7]["image"] = "../../" + entries[7]["image"]
    (data / "train.json").write_text(json.dumps(entries))
    code = clipstudy_main(
        ["train", "--profile", "smoke", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    )
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 2 and "Traceback" not in err
    assert str(data / "train.json") in line and "entry 7 " in line and "outside the image root" in line
    # rejected before any step: the cell is recorded as failed with the reason, nothing was trained
    failed = read_metrics(tmp_path / "run")
    assert failed["status"] == "failed" and "entry 7 " in failed["error"]
    assert checkpoint_paths(tmp_path / "run" / "checkpoints") == []
    assert not (tmp_path / "run" / "history.csv").exists()


# ============================================================ bad parameters
@pytest.mark.parametrize(
    "args, names",
    [
        (["--optimizer", "rmsprop"], ["'optimizer'", "rmsprop"]),
        (["--loss", "triplet"], ["'loss'", "triplet"]),
        (["--lr", "-0.1"], ["'lr'", "cannot be negative"]),
        (["--epochs", "three"], ["'epochs'", "three"]),
        (["--batch_size", "100000"], ["'batch_size'", "larger than the training set", "lower batch_size"]),
    ],
)
def test_train_cli_rejects_bad_parameters(demo_data_dir, tmp_path, capsys, args, names):
    run = tmp_path / "run"
    code = clipstudy_main(
        ["train", "--profile", "smoke", "--data", str(demo_data_dir), "--out", str(run), "--no-progress", *args]
    )
    err = capsys.readouterr().err
    line = error_line(err)
    assert code == 2 and "Traceback" not in err
    for name in names:
        assert name in line
    assert not (run / "metrics.json").exists() and checkpoint_paths(run / "checkpoints") == []


@pytest.mark.parametrize(
    "args, names",
    [
        (["--profile", "huge"], ["--profile", "huge"]),
        (["--no-such-flag", "1"], ["--no-such-flag"]),
    ],
)
def test_train_cli_rejects_unknown_choices_and_flags(capsys, args, names):
    with pytest.raises(SystemExit) as caught:
        clipstudy_main(["train", *args])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    for name in names:
        assert name in err


@pytest.mark.parametrize(
    "args, names",
    [
        (["--optimizers", "adamw,rmsprop"], ["'optimizer'", "rmsprop"]),
        (["--losses", "clip,triplet"], ["'loss'", "triplet"]),
        (["--lr", "-1"], ["'lr'", "cannot be negative"]),
        (["--lr", "adamw=-1e-3"], ["'lr'", "cannot be negative"]),
        (["--lr", "adamw=fast"], ["--lr", "fast"]),
        (["--seeds", "0,one"], ["--seeds", "one"]),
        (["--set", "epochz=3"], ["--set", "epochz"]),
        (["--set", "epochs=many"], ["'epochs'", "many"]),
        (["--variant", "../escape=adamw", "--optimizers", "../escape"], ["'label'", "../escape"]),
        (["--jobs", "0"], ["--jobs"]),
    ],
)
def test_sweep_cli_rejects_bad_parameters_before_running(demo_data_dir, tmp_path, capsys, args, names):
    runs = tmp_path / "runs"
    code = clipstudy_main(["sweep", "--profile", "smoke", "--data", str(demo_data_dir), "--runs", str(runs), *args])
    line = error_line(capsys.readouterr().err)
    assert code == 2
    for name in names:
        assert name in line
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing created


def test_sweep_cli_rejects_unknown_profile(capsys):
    with pytest.raises(SystemExit) as caught:
        clipstudy_main(["sweep", "--profile", "huge", "--dry-run"])
    assert caught.value.code == 2 and "huge" in capsys.readouterr().err


def test_evaluate_and_report_cli_name_the_missing_run(tmp_path, capsys):
    assert clipstudy_main(["evaluate", "--run", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    assert (
        clipstudy_main(
            ["report", "--profile", "smoke", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert str(tmp_path / "empty") in capsys.readouterr().err


# ============================================================ names cannot leave the runs folder
@pytest.mark.parametrize(
    "label, loss",
    [
        ("../../etc", "clip"),
        ("/abs/path", "x/y"),
        ("..", ".."),
        (".hidden", "a/../../b"),
        ("a\\..\\b", "\0"),
        ("", ""),
        ("x" * 3, "../" * 50),
    ],
)
def test_cell_names_are_one_safe_path_component(tmp_path, label, loss):
    name = cell_name(label, loss, 0)
    assert "/" not in name and "\0" not in name and name not in (".", "..") and not name.startswith(".")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_plan_cells_keeps_every_cell_inside_the_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    kw = dict(overrides={"data": str(tmp_path)}, runs_root=runs)
    with pytest.raises(ConfigError, match="'label'"):
        plan_cells("smoke", optimizers=["../../evil"], variants={"../../evil": {"optimizer": "adamw"}}, **kw)
    with pytest.raises(ConfigError, match="'optimizer'"):
        plan_cells("smoke", optimizers=["../adamw"], **kw)
    with pytest.raises(ConfigError, match="'loss'"):
        plan_cells("smoke", losses=["../clip"], **kw)
    cells = plan_cells(
        "smoke",
        optimizers=["adamw", "sgd+hi"],
        losses=["clip", "siglip"],
        seeds=[0, 7],
        variants={"sgd+hi": {"optimizer": "sgd", "lr": 0.1}},
        **kw,
    )
    assert len(cells) == 8
    for cell in cells:
        assert cell.out.parent == runs and cell.out.name == cell.name
        assert cell.config.out == str(cell.out)
    assert not runs.exists()


# ============================================================ end to end: kill -9 of a sweep
def sweep_command(data, runs, optimizers, losses, *extra):
    return [
        sys.executable,
        "-m",
        "clipstudy",
        "sweep",
        "--profile",
        "smoke",
        "--data",
        str(data),
        "--runs",
        str(runs),
        "--optimizers",
        optimizers,
        "--losses",
        losses,
        "--jobs",
        "1",
        "--set",
        "threads=1",
        *extra,
    ]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), e.g. the kernel papermill started in its own session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def lock_holders(run: Path) -> list[str]:
    """Command lines of the processes that have ``run``'s lock files open (for failure messages)."""
    found = []
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in (str(run / ".lock"), str(run / SWEEP_LOCK_NAME)):
                found.append(Path(f"/proc/{fd.parts[2]}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_everything(proc: subprocess.Popen) -> list[int]:
    """``kill -9`` of the sweep, its process group and every descendant (the notebook kernel runs in its own
    session, so killing the group alone would not reach it); waits until they are gone. Returns the
    descendants' pids."""
    pids = descendants(proc.pid)
    kernels = [pid for pid in pids if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    return kernels


def start_sweep(cmd, log: Path) -> subprocess.Popen:
    """Start a sweep in its own session; its stdout (one line per cell) goes to ``log``, stderr beside it."""
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO_ROOT, start_new_session=True)


def completed(run: Path) -> bool:
    try:
        return json.loads((run / "metrics.json").read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


def has_full_checkpoint(run: Path) -> bool:
    return any(p.with_name(p.name + ".sha256").is_file() for p in checkpoint_paths(run / "checkpoints"))


def stamp(run: Path) -> tuple[int, str]:
    return (run / "metrics.json").stat().st_mtime_ns, (run / "metrics.json").read_text()


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                kill_everything(proc)
            pytest.fail(
                f"sweep ended or timed out before the expected state; its output:\n{log.read_text()}\n"
                f"{log.with_suffix('.err').read_text()[-3000:]}"
            )
        time.sleep(0.05)


@pytest.mark.faults
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "optimizers, losses",
    [
        pytest.param("adamw,sgd,adam", "isogclr", id="every-optimizer"),
        pytest.param("adam", "sogclr,onlineclr", id="every-other-stateful-loss"),
    ],
)
def test_kill9_of_a_sweep_mid_cell_then_rerun(demo_data_dir, tmp_path, optimizers, losses):
    """Each cell in turn is killed mid-training (with everything the sweep started); every rerun leaves the
    finished cells untouched, resumes the killed one from its newest checkpoint, and the final results equal
    uninterrupted runs of the same cells."""
    epochs = 6  # five epochs left after the first checkpoint: far more than the time between two polls
    runs = tmp_path / "runs"
    cmd = sweep_command(demo_data_dir, runs, optimizers, losses, "--set", f"epochs={epochs}")
    cells = [(opt, loss) for opt in optimizers.split(",") for loss in losses.split(",")]
    names = [cell_name(opt, loss, 0) for opt, loss in cells]
    finished: dict[str, tuple] = {}
    resumed_from: dict[str, str] = {}
    for k, name in enumerate(names):
        log = tmp_path / f"sweep-{k}.log"
        proc = start_sweep(cmd, log)
        wait_for(lambda: all(completed(runs / n) for n in names[:k]) and has_full_checkpoint(runs / name), proc, log)  # noqa: B023
        assert len(kill_everything(proc)) == 1  # the sweep and the kernel training the cell
        assert not completed(runs / name), "the cell finished before the kill; nothing was interrupted"
        deadline = time.time() + 15  # the locks die with their holders
        while (is_locked(runs / name) or is_locked(runs / name, SWEEP_LOCK_NAME)) and time.time() < deadline:
            time.sleep(0.05)
        assert not is_locked(runs / name) and not is_locked(runs / name, SWEEP_LOCK_NAME), lock_holders(runs / name)
        _, path, _ = load_latest(runs / name / "checkpoints")
        resumed_from[name] = path.name
        for done in names[:k]:
            finished.setdefault(done, stamp(runs / done))
            assert stamp(runs / done) == finished[done], f"{done} was touched after it finished"
    final = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    for done in names[:-1]:
        assert re.search(rf"{re.escape(done)}\s+skipped \(done", final.stdout), final.stdout
        assert stamp(runs / done) == finished[done], f"{done} was touched after it finished"
    assert re.search(rf"{re.escape(names[-1])}\s+completed", final.stdout), final.stdout

    for (opt, loss), name in zip(cells, names):
        notebook = (runs / name / "train.ipynb").read_text()
        assert re.search(rf"resumed from \S*{re.escape(resumed_from[name])}", notebook), name
        reference = train(
            smoke(demo_data_dir, tmp_path / "reference" / name, optimizer=opt, loss=loss, epochs=epochs), progress=False
        )
        assert comparable(read_metrics(runs / name)) == comparable(reference), name
        assert_same_weights(newest_state(runs / name), newest_state(tmp_path / "reference" / name))
        assert_same_history(runs / name, tmp_path / "reference" / name)


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_kernel_of_a_sweep_killed_alone_stops_by_itself(demo_data_dir, tmp_path):
    """``kill -9`` of the sweep process only (a user killing the pid they see): the notebook kernel it started
    lives in its own session and survives the kill, notices within seconds that its parent is gone, exits
    and frees the cell, which a rerun then resumes."""
    runs = tmp_path / "runs"
    log = tmp_path / "sweep.log"
    proc = start_sweep(sweep_command(demo_data_dir, runs, "sgd", "clip", "--set", "epochs=50"), log)
    run = runs / "sgd-clip-s0"
    wait_for(lambda: has_full_checkpoint(run), proc, log)
    kernels = [pid for pid in descendants(proc.pid) if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(kernels) == 1
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while (alive(kernels[0]) or is_locked(run)) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(kernels[0]) and not is_locked(run), lock_holders(run)
    finally:
        if alive(kernels[0]):
            os.kill(kernels[0], signal.SIGKILL)
    assert not completed(run)  # stopped mid-cell: 50 epochs take far longer than the kernel needed to stop
    from clipstudy.study.cells import cell_state

    assert cell_state(run)[0] == "partial"


# ============================================================ end to end: two sweeps at once
@pytest.mark.faults
@pytest.mark.timeout(900)
def test_two_sweeps_on_one_folder_train_each_cell_once(demo_data_dir, tmp_path):
    runs = tmp_path / "runs"
    optimizers, loss = ("adamw", "sgd", "adam"), "clip"
    cmd = sweep_command(demo_data_dir, runs, ",".join(optimizers), loss, "--set", "epochs=1")
    logs = [tmp_path / "sweep-a.log", tmp_path / "sweep-b.log"]
    procs = [start_sweep(cmd, log) for log in logs]
    try:
        for proc in procs:
            proc.wait(timeout=800)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_everything(proc)
    outputs = [log.read_text() for log in logs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    for opt in optimizers:
        name = cell_name(opt, loss, 0)
        trained = [bool(re.search(rf"^{re.escape(name)}\s+completed", out, re.M)) for out in outputs]
        skipped = [
            bool(re.search(rf"^{re.escape(name)}\s+skipped \((another sweep is running it|running|done)", out, re.M))
            for out in outputs
        ]  # stdout holds only the per-cell lines
        assert sorted(trained) == [False, True], (name, outputs)  # trained by exactly one sweep
        assert skipped == [not t for t in trained], (name, outputs)  # and reported as skipped by the other
        run = runs / name
        reference = train(
            smoke(demo_data_dir, tmp_path / "reference" / name, optimizer=opt, loss=loss, epochs=1), progress=False
        )
        assert comparable(read_metrics(run)) == comparable(reference)
        history = pd.read_csv(run / "history.csv")
        assert history["step"].tolist() == list(range(1, SMOKE_STEPS_PER_EPOCH + 1))
        assert_same_history(run, tmp_path / "reference" / name)
        assert "CellBusy" not in (run / "train.ipynb").read_text()


# ============================================================ end to end: divergence shows in the report
@pytest.mark.faults
@pytest.mark.timeout(600)
def test_diverged_cell_is_recorded_the_sweep_goes_on_and_the_report_shows_it(demo_data_dir, tmp_path, capsys):
    from clipstudy.study import report

    runs = tmp_path / "runs"
    code = clipstudy_main(
        [
            "sweep",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(runs),
            "--optimizers",
            "sgd,adamw",
            "--losses",
            "sogclr",
            "--lr",
            "sgd=1e12",
            "--jobs",
            "1",
            "--set",
            "warmup_steps=0",
            "--set",
            "epochs=1",
            "--set",
            "threads=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    boom = read_metrics(runs / "sgd-sogclr-s0")  # standard JSON, no NaN, even for a diverged run
    step = boom["diverged_at_step"]
    assert boom["status"] == "diverged" and isinstance(step, int) and 1 <= step <= SMOKE_STEPS_PER_EPOCH
    assert read_metrics(runs / "adamw-sogclr-s0")["status"] == "completed"
    diverged_line = out.index("sgd-sogclr-s0")
    assert f"DIVERGED at step {step}" in out[diverged_line:].splitlines()[0]
    assert out.index("adamw-sogclr-s0") > diverged_line  # the sweep went on after the divergence
    strict_json(runs / "sgd-sogclr-s0" / "config.json")

    html = report.render("smoke", runs, tmp_path / "report").read_text()
    assert f"sgd-sogclr-s0 at step {step}" in html
    table = pd.read_csv(tmp_path / "report" / "study_table.csv").set_index(["Optimizer", "Method"])
    assert table.loc[("SGD", "SogCLR"), "Status"] == "1 diverged"
    assert table.loc[("AdamW", "SogCLR"), "Status"] == "ok"
