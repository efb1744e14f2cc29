"""Every command of ``python -m clipstudy`` answers ``--help`` and refuses a bad value in one line.

The list of commands is read from the dispatcher, so a new command is covered
(or this file fails until it names a bad value for it).
"""

from __future__ import annotations

import pytest

from clipstudy.__main__ import COMMANDS, main


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own exits (--help, an unknown option)
        return int(exit_.code or 0)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command, capsys):
    assert run([command, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def bad_values(tmp) -> dict[str, list[str]]:
    """One bad value per command, each past argparse, so the command's own check must refuse it."""
    missing = str(tmp / "missing")
    return {
        "train": ["--profile", "smoke", "--epochs", "many"],
        "evaluate": ["--run", missing],
        "sweep": ["--profile", "smoke", "--set", "no_such_field=1", "--dry-run"],
        "tune": ["--seeds", "5"],  # a reporting seed: tuning seeds start at 1000
        "study": ["--seeds", "1000"],  # a tuning seed: reporting seeds stay below 1000
        "report": ["--runs", missing],
        "check-data": ["--data", missing],
        "make-demo-data": ["--out", str(tmp / "demo"), "--train-size", "0"],
        "prepare-data": ["coco-karpathy", "--src", missing, "--images", str(tmp), "--out", str(tmp / "out")],
        "fetch-weights": ["--dest", str(tmp / "file" / "below-a-file")],
        "list": [],  # takes no values: see test_list_takes_no_values
    }


def test_every_command_has_a_bad_value_here(tmp_path):
    assert set(bad_values(tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"list", "fetch-weights"}))
def test_a_bad_value_is_one_line_and_exit_2(command, tmp_path, capsys):
    code = run([command, *bad_values(tmp_path)[command]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err


def test_fetch_weights_refuses_a_destination_below_a_file_in_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the refusal must come from the path alone
    code = run(["fetch-weights", *bad_values(tmp_path)["fetch-weights"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error:"), err


def test_list_takes_no_values(capsys):
    assert run(["list", "extra"]) == 2
    assert run(["list"]) == 0
    out = capsys.readouterr().out
    assert "clip" in out and "adamw" in out
