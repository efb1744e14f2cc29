"""Every start-up failure is one line and exit 2, every write failure one line and exit 1.

The bad inputs a new user meets (issue-style list): loss or optimizer
parameters the loss / optimizer does not take, the paper profile without
weights or data, ``evaluate`` from another directory, a full disk while the
run's records are written, a missing demo data set, a sweep with a typo in
``--lr``. Each goes through the dispatcher (``python -m clipstudy``), which
is the one place that turns errors into lines and exit statuses.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import clipstudy.engine.train as train_mod
import clipstudy.fileio as fileio
from clipstudy.__main__ import COMMANDS
from clipstudy.__main__ import main as clipstudy_main
from clipstudy.engine import config as config_mod
from clipstudy.engine import records
from clipstudy.engine.config import FIELDS

REPO_ROOT = Path(__file__).resolve().parent.parent


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one non-empty line, starting with ``error:``; no traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert "Traceback" not in err
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def smoke_train(data, out, *extra) -> list[str]:
    return [
        "train",
        "--profile",
        "smoke",
        "--data",
        str(data),
        "--out",
        str(out),
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """Empty torch / Hugging Face caches and no local weight copies: nothing pretrained is available."""
    for name in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    for name in ("CLIPSTUDY_RESNET50_WEIGHTS", "CLIPSTUDY_DISTILBERT"):
        monkeypatch.delenv(name, raising=False)


# ============================================================ exit 2: cannot start as given
@pytest.mark.parametrize(
    "extra, names",
    [
        (["--loss", "clip", "--loss_params", '{"gamma": 0.9}'], ["gamma"]),
        (["--optimizer_params", '{"betas": 0.9}'], ["betas"]),
    ],
)
def test_parameters_a_loss_or_optimizer_refuses(demo_data_dir, tmp_path, capsys, extra, names):
    code = clipstudy_main(smoke_train(demo_data_dir, tmp_path / "run", *extra))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    for name in names:
        assert name in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_paper_profile_without_weights(demo_data_dir, tmp_path, capsys, no_weights):
    code = clipstudy_main(
        ["train", "--profile", "paper", "--data", str(demo_data_dir), "--out", str(tmp_path / "run"), "--no-progress"]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "'image_weights'" in line and "fetch-weights --profile paper" in line
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_sweep_paper_without_weights_fails_before_any_cell(demo_data_dir, tmp_path, capsys, no_weights, monkeypatch):
    import clipstudy.study.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_cell", lambda *a, **k: pytest.fail("a cell was started"))
    runs = tmp_path / "runs"
    code = clipstudy_main(
        [
            "sweep",
            "--profile",
            "paper",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(runs),
            "--optimizers",
            "adamw,sgd",
            "--losses",
            "clip",
        ]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "fetch-weights --profile paper" in line
    assert not runs.exists()


def test_sweep_paper_without_data_fails_before_any_cell(tmp_path, capsys, monkeypatch):
    import clipstudy.study.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "run_cell", lambda *a, **k: pytest.fail("a cell was started"))
    code = clipstudy_main(
        ["sweep", "--profile", "paper", "--runs", str(tmp_path / "runs"), "--optimizers", "adamw", "--losses", "clip"]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "'train_ann'" in line and "data" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_missing_demo_data_says_how_to_make_it(tmp_path, capsys, command):
    missing = tmp_path / "no-demo"
    args = (
        smoke_train(missing, tmp_path / "run")
        if command == "train"
        else ["sweep", "--profile", "smoke", "--data", str(missing), "--runs", str(tmp_path / "runs")]
    )
    code = clipstudy_main(args)
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "'data'" in line and str(missing) in line
    assert "make demo-data" in line and f"python -m clipstudy make-demo-data --out {missing}" in line


def test_sweep_lr_typo_names_it_and_the_valid_names(demo_data_dir, tmp_path, capsys):
    code = clipstudy_main(
        [
            "sweep",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(tmp_path / "runs"),
            "--lr",
            "adamw=1e-3,sgdd=0.1",
            "--dry-run",
        ]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "'sgdd'" in line and "'sgd'" in line and "'adamw'" in line


@pytest.mark.parametrize(
    "variant, names",
    [
        ("fast=sgdd:lr=0.1", ["sgdd", "'sgd'"]),
        ("fast=sgd:lrr=0.1", ["lrr", "valid fields"]),
    ],
)
def test_sweep_variant_typos(demo_data_dir, tmp_path, capsys, variant, names):
    code = clipstudy_main(
        [
            "sweep",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(tmp_path / "runs"),
            "--variant",
            variant,
            "--dry-run",
        ]
    )
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    for name in names:
        assert name in line


def test_no_command_prints_usage_and_exits_two(capsys):
    assert clipstudy_main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m clipstudy <command>") and "train" in err


def test_debug_shows_the_traceback_and_keeps_the_exit_status(demo_data_dir, tmp_path, monkeypatch, capsys):
    args = smoke_train(demo_data_dir, tmp_path / "run", "--epochs", "zero")
    for argv in ([*args, "--debug"], args):
        assert clipstudy_main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "ConfigError" in err
        assert err.strip().splitlines()[-1] == "error: config field 'epochs': 'zero' is not a valid int"
        monkeypatch.setenv("CLIPSTUDY_DEBUG", "1")  # the second round: the variable instead of the flag


# ============================================================ options: typos, abbreviations
def run_parsed(argv: list[str]) -> int:
    try:
        return clipstudy_main(argv)
    except SystemExit as exit_:  # argparse's own exit
        return int(exit_.code or 0)


@pytest.mark.parametrize(
    "argv, meant",
    [
        (["train", "--optimzer", "sgd"], "--optimizer"),
        (["train", "--lr", "1e-3", "--weight_decy=0.1"], "--weight_decay"),
        (["evaluate", "--run", "x", "--chekpoint", "c"], "--checkpoint"),
        (["report", "--runz", "x"], "--runs"),
        (["fetch-weights", "--profle", "demo"], "--profile"),
        (["prepare-data", "coco-karpathy", "--sr", "a", "--images", "b", "--out", "c"], "--src"),
        (["list", "--verbose"], None),
    ],
)
def test_a_wrong_option_is_one_line_naming_the_closest(argv, meant, capsys):
    assert run_parsed(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    wrong = next(word.split("=")[0] for word in argv if word.startswith("--") and word.split("=")[0] in line)
    assert f"unknown option {wrong}" in line and f"{argv[0]} --help` lists the options" in line
    assert (f"(did you mean {meant}?)" in line) if meant else "did you mean" not in line


# An abbreviation of a real option, with a value its command would refuse if it took the abbreviation.
ABBREVIATED = {
    "train": ["--epoch", "zero"],
    "evaluate": ["--run", "/nowhere", "--checkp", "c"],
    "report": ["--prof", "demo", "--runs", "/nowhere"],
    "fetch-weights": ["--prof", "nosuch"],
    "prepare-data": ["coco-karpathy", "--sr", "/nowhere", "--images", "/nowhere", "--out", "/nowhere"],
    "list": ["--he"],
    "sweep": ["--prof", "nosuch"],
    "tune": ["--prof", "nosuch"],
    "study": ["--prof", "nosuch"],
    "check-data": ["--dat", "/nowhere"],
    "make-demo-data": ["--ou", "/nowhere", "--train-size", "0"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_takes_an_abbreviated_option(command, capsys):
    assert command in ABBREVIATED, f"name an abbreviated option of {command!r} in ABBREVIATED"
    argv = [command, *ABBREVIATED[command]]
    assert run_parsed(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown option --" in line and "(did you mean --" in line


def test_prepare_data_errors_are_error_lines(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = clipstudy_main(["prepare-data", "cc3m", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: prepare-data cc3m: {tmp_path / 'empty'}: ")


def test_fetch_weights_offline_fails_in_seconds_in_one_line(monkeypatch, capsys):
    import socket
    import time

    import huggingface_hub
    import transformers

    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def offline(address, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def download(*args, **kwargs):
        pytest.fail("a download was tried while offline (the downloaders retry for half a minute)")

    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(transformers.DistilBertModel, "from_pretrained", download)
    started = time.perf_counter()
    code = clipstudy_main(["fetch-weights", "--profile", "paper"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and time.perf_counter() - started < 30
    assert "cannot reach huggingface.co (Name or service not known)" in line and "CLIPSTUDY_RESNET50_WEIGHTS" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline by choice: no connection tried either
    assert clipstudy_main(["fetch-weights", "--profile", "paper"]) == 1
    assert "HF_HUB_OFFLINE is set" in one_error_line(capsys.readouterr().err)


# ============================================================ evaluate from elsewhere
@pytest.fixture(scope="module")
def trained_run(demo_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    code = clipstudy_main(smoke_train(demo_data_dir, out, "--epochs", "1", "--max_steps", "2"))
    assert code == 0
    return out


def test_evaluate_from_another_directory(trained_run, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert clipstudy_main(["evaluate", "--run", str(trained_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["global_step"] == 2 and "txt_r1" in metrics
    # a relative --run that does not exist from here: one line naming it
    assert clipstudy_main(["evaluate", "--run", "run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--run run" in line and "config.json" in line


def test_evaluate_with_the_data_gone(trained_run, tmp_path, capsys):
    record = json.loads((trained_run / "config.json").read_text())
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("config.json",):
        (moved / name).write_text(
            json.dumps({**record, "config": {**record["config"], "data": str(tmp_path / "gone")}})
        )
    (moved / "checkpoints").symlink_to(trained_run / "checkpoints")
    assert clipstudy_main(["evaluate", "--run", str(moved)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'data'" in line and str(tmp_path / "gone") in line


# ============================================================ exit 1: a write failed
@pytest.mark.parametrize("name", ["config.json", "history.csv", "epochs.csv", "metrics.json"])
def test_full_disk_while_writing_a_record(demo_data_dir, tmp_path, monkeypatch, capsys, name):
    real = fileio.replace_atomically

    def no_space_for(path, data):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(fileio, "replace_atomically", no_space_for)
    out = tmp_path / "run"
    code = clipstudy_main(smoke_train(demo_data_dir, out, "--epochs", "1", "--max_steps", "2"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1
    assert re.match(
        rf"error: cannot write {re.escape(str(out / name))} \(\d+(\.\d)? (bytes|KiB|MiB)\): "
        r"No space left on device\. Free disk space",
        line,
    ), line


def test_full_disk_while_writing_the_lock(demo_data_dir, tmp_path, monkeypatch, capsys):
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", no_space)
    out = tmp_path / "run"
    assert clipstudy_main(smoke_train(demo_data_dir, out)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out / '.lock'} (") and "No space left on device" in line


def test_a_multi_line_message_becomes_one_line(monkeypatch, capsys):
    from clipstudy.core.models import WeightsUnavailable

    def unavailable(config, progress):
        raise WeightsUnavailable("DistilBERT (distilbert-base-uncased)\nFix: run fetch-weights\n")

    monkeypatch.setattr(train_mod, "train", unavailable)
    assert clipstudy_main(["train", "--profile", "smoke", "--data", "/nowhere", "--no-progress"]) == 2
    assert (
        one_error_line(capsys.readouterr().err) == "error: DistilBERT (distilbert-base-uncased) Fix: run fetch-weights"
    )


def test_other_os_errors_are_one_line_too(monkeypatch, capsys):
    def full(config, progress):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_mod, "train", full)
    assert clipstudy_main(["train", "--profile", "smoke", "--data", "/nowhere", "--no-progress"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "--debug" in line


# ============================================================ interrupt, ranks, sweep status
def test_interrupt_says_how_to_resume_and_keeps_the_csv_headers(demo_data_dir, tmp_path, monkeypatch, capsys):
    original = train_mod.train_step

    def step_then_signal(run, batch):
        result = original(run, batch)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the first step: before any evaluation
        return result

    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    out = tmp_path / "run"
    code = clipstudy_main(smoke_train(demo_data_dir, out))
    err = capsys.readouterr().err
    assert code == 130
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "rerun the same command to resume" in stopped[0]
    header = (out / "epochs.csv").read_text().splitlines()
    assert header == [",".join(records.EPOCH_COLUMNS)]
    assert (out / "history.csv").read_text().splitlines()[0].startswith("step,epoch,loss,lr")


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_only_rank_zero_prints_the_metrics(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(train_mod, "train", lambda config, progress: {"status": records.COMPLETED, "average": 1.0})
    assert clipstudy_main(["train", "--profile", "smoke", "--data", "/nowhere", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (json.loads(out) == {"status": "completed", "average": 1.0}) if printed else out == ""


@pytest.mark.parametrize(
    "statuses, code",
    [
        (["completed", "failed"], 1),
        (["completed", "diverged"], 0),
        (["completed", "busy"], 0),
    ],
)
def test_sweep_exit_status_after_its_summary(demo_data_dir, tmp_path, monkeypatch, capsys, statuses, code):
    import clipstudy.study.sweep as sweep_mod

    given = iter(statuses)
    monkeypatch.setattr(
        sweep_mod,
        "run_cell",
        lambda cell, **k: {"status": next(given), "cell": cell.name, "error": "boom", "diverged_at_step": 3},
    )
    result = clipstudy_main(
        [
            "sweep",
            "--profile",
            "smoke",
            "--data",
            str(demo_data_dir),
            "--runs",
            str(tmp_path / "runs"),
            "--optimizers",
            "adamw,sgd",
            "--losses",
            "clip",
        ]
    )
    captured = capsys.readouterr()
    assert result == code
    assert "sweep finished" in captured.out  # the summary comes first
    assert ("1 cell(s) failed" in captured.err) == (code == 1)


# ============================================================ --help
def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as caught:
        clipstudy_main(argv)
    assert caught.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word sequences


def test_every_field_has_a_help_line():
    from clipstudy.engine.config_help import FIELD_HELP

    assert set(FIELD_HELP) == set(FIELDS)


def test_help_shows_the_profile_defaults_and_the_sentinels(capsys):
    demo = help_text(["train", "--profile", "demo", "--help"], capsys)
    demo_lr = config_mod.DEMO["lr"]
    assert f"peak learning rate; 0 = the optimizer's default [demo: {demo_lr!r}]" in demo
    assert "linear warm-up steps; -1 = one epoch [demo: 20]" in demo
    paper = help_text(["train", "--profile", "paper", "--help"], capsys)
    assert "0 = the optimizer's default [paper: 0.0]" in paper
    assert "-1 = one epoch [paper: 500]" in paper and "[paper: 'original']" in paper
    default = help_text(["train", "--help"], capsys)  # no --profile: the command's default, demo
    assert f"[demo: {demo_lr!r}]" in default
    assert "[demo:" not in help_text(["evaluate", "--help"], capsys)  # evaluate's defaults are the run's
    sweep = help_text(["sweep", "--profile", "paper", "--help"], capsys)  # the fields of --set
    assert "lr peak learning rate; 0 = the optimizer's default [paper: 0.0]" in sweep
    assert "warmup_steps linear warm-up steps; -1 = one epoch [paper: 500]" in sweep


def test_evaluate_help_lists_only_the_fields_evaluation_reads(capsys):
    from clipstudy.cli.commands import EVALUATION_FIELDS

    listed = set(re.findall(r"--([a-z_]+)", help_text(["evaluate", "--help"], capsys))) & set(FIELDS)
    assert listed == set(EVALUATION_FIELDS)
    assert {"data", "eval_batch_size", "device"} <= listed and not {"lr", "epochs", "optimizer"} & listed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_does_not_import_torch(command):
    code = (
        f"import sys\nfrom clipstudy.__main__ import main\ntry:\n    main([{command!r}, '--help'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
    assert "usage:" in done.stdout


def test_profile_default_matches_make_config():
    """The help's defaults are what a run of that profile gets (paths aside: they are made absolute)."""
    for profile in config_mod.PROFILES:
        made = config_mod.make_config(profile, data="/d") if profile != "paper" else config_mod.make_config(profile)
        for name in FIELDS:
            if name in config_mod.PATH_FIELDS or name in ("loss_params",):
                continue
            assert config_mod.profile_default(name, profile) == getattr(made, name), (profile, name)
