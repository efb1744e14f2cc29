"""The sweep's own settings, remembered in its runs folder (``RUNS/sweep.json``).

Every sweep that runs or submits cells writes the options it ran with (the
cells, ``--set``, ``--data``, where and how cells run) to ``sweep.json`` in
its runs folder. A later ``sweep --status``, ``--dry-run`` or plain rerun of
that folder takes every option it is not given from there, so no option has
to be repeated: ``sweep --runs R --status`` describes what is in ``R`` instead
of comparing it with the default settings (which would call every cell run
with ``--set`` stale). Options given on the command line win, so a status
with other settings still shows which cells they would make stale.

The file keeps each distinct sweep run into the folder (latest last): a
status with no cell options shows the cells of all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from clipstudy import paths
from clipstudy.fileio import write_json

MANIFEST = "sweep.json"
KEEP = 20  # distinct sweeps remembered per runs folder
# what the cells are: a status without any of these shows every remembered sweep's cells
PLANNING = ("profile", "optimizers", "losses", "seeds", "lr", "lr_from", "protocol", "variant", "set", "data")
# where and how they run
RUNNING = (
    "executor",
    "jobs",
    "partition",
    "account",
    "time",
    "gpus_per_cell",
    "procs_per_node",
    "nodes",
    "cpus_per_cell",
    "mem_gb",
    "max_running",
    "max_requeues",
    "sbatch",
)
ENVIRONMENT = {"executor": "EXECUTOR", "jobs": "JOBS"}  # an option whose default a variable sets counts as given


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The options ``argv`` gives (argparse's names), told apart from defaults by parsing with no defaults."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action, default in saved:
            action.default = default
    return given | {name for name, variable in ENVIRONMENT.items() if os.environ.get(variable)}


def runs_folder(args) -> Path:
    return Path(args.runs).resolve() if args.runs else paths.runs_dir(args.profile)


def read(folder: Path) -> list[dict]:
    """The remembered sweeps' settings, oldest first ([] without a readable manifest)."""
    try:
        sweeps = json.loads((folder / MANIFEST).read_text()).get("sweeps", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [s["settings"] for s in sweeps if isinstance(s, dict) and isinstance(s.get("settings"), dict)]


def settings_of(args) -> dict:
    settings = {name: getattr(args, name) for name in (*PLANNING, *RUNNING) if hasattr(args, name)}
    for name in ("data", "lr_from"):  # paths: the folder's, whichever directory a later command runs in
        if settings.get(name):
            settings[name] = str(Path(settings[name]).resolve())
    return settings


def write(folder: Path, args) -> None:
    """Remember this sweep's settings in ``folder/sweep.json`` (moved last when the same settings ran before)."""
    settings = settings_of(args)
    try:
        sweeps = json.loads((folder / MANIFEST).read_text()).get("sweeps", [])
    except (OSError, ValueError, AttributeError):
        sweeps = []
    sweeps = [s for s in sweeps if isinstance(s, dict) and s.get("settings") != settings]
    sweeps.append({"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": settings})
    write_json(folder / MANIFEST, {"version": 1, "sweeps": sweeps[-KEEP:]})


def fill(args, given: set[str], settings: dict, defaults: dict) -> list[str]:
    """Set every remembered option of ``settings`` that ``given`` lacks on ``args``; return those that differ
    from ``defaults`` as flags (what the command line would have needed)."""
    taken = []
    for name, value in settings.items():
        if name in (*PLANNING, *RUNNING) and name not in given and hasattr(args, name):
            setattr(args, name, value)
            if value != defaults.get(name):
                taken += as_flags(name, value)
    return taken


def as_flags(name: str, value) -> list[str]:
    """``("set", ["epochs=1"])`` -> ``["--set", "epochs=1"]``: an option as it is typed."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, list):
        return [word for item in value for word in (flag, str(item))]
    if value is None or value == "" or value is False:
        return []
    return [flag] if value is True else [flag, str(value)]
