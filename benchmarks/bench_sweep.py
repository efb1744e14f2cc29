"""Where the demo sweep's wall time goes, cell by cell, and what papermill costs.

Reads finished run directories (``reports/runs/demo/<cell>/`` by default):
the executed notebook ``train.ipynb`` (papermill records each cell's start,
end and duration in its metadata, and the notebook's own start and duration),
``history.csv`` (per-step ``data_time`` and ``step_time``), ``epochs.csv``
(``eval_time``) and ``metrics.json`` (``wall_time_s``: the time inside
``train()``'s loop, evaluation included). Each cell's wall time is split into:

* ``kernel``: kernel start (notebook start to its first cell);
* ``imports``: the notebook cells before the one calling ``train(`` (parameters,
  imports, configuration);
* ``setup``: inside the ``train(`` cell but outside ``train()``'s timed loop
  (data sets, model, optimizer, checkpoint lookup);
* ``data``, ``steps``, ``eval``: waiting for batches, training steps, evaluation;
* ``loop other``: the rest of the timed loop (logging, checkpoints, progress);
* ``after``: the cells after ``train(`` (tables, plots) and saving.

Notebook-side time = kernel + imports + after, as a share of the cell's wall
time: an upper bound on what papermill adds, since a command-line run imports
torch too. The full run (not ``--quick``) also measures papermill's cost
directly: one short demo cell through ``clipstudy.study.cells.run_cell`` and the same
cell through ``python -m clipstudy train``, side by side; the difference over
the mean cell's wall time is papermill's overhead. Goal: < 10%.

Usage: ``python benchmarks/bench_sweep.py [--runs DIR]``; writes
``reports/benchmarks/sweep.json``. With no executed notebooks it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, REPO, table, write_json  # noqa: E402

from clipstudy import paths  # noqa: E402

DEFAULT_OUT = OUT_DIR / "sweep.json"
DEFAULT_RUNS = paths.runs_dir("demo")
GOAL_PERCENT = 10.0
PARTS = ("kernel", "imports", "setup", "data", "steps", "eval", "loop_other", "after")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _csv_rows(path: Path) -> list[dict]:
    try:
        with path.open() as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _sum(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows if r.get(key) not in (None, ""))


def cell_breakdown(run_dir: Path) -> dict | None:
    """The wall-time split of one executed cell, or None if it has no complete executed notebook."""
    try:
        nb = json.loads((run_dir / "train.ipynb").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    meta = nb.get("metadata", {}).get("papermill", {})
    if not meta.get("duration") or metrics.get("status") != "completed":
        return None
    cells = [c for c in nb["cells"] if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    train_at = next(
        (i for i, c in enumerate(cells) if c.get("cell_type") == "code" and "train(" in "".join(c.get("source", ""))),
        None,
    )
    if not cells or train_at is None:
        return None
    durations = [float(c["metadata"]["papermill"].get("duration") or 0.0) for c in cells]
    total = float(meta["duration"])
    kernel = (_time(cells[0]["metadata"]["papermill"]["start_time"]) - _time(meta["start_time"])).total_seconds()
    imports = sum(durations[:train_at])
    train_cell = durations[train_at]
    history, epochs = _csv_rows(run_dir / "history.csv"), _csv_rows(run_dir / "epochs.csv")
    data, steps, evaluation = _sum(history, "data_time"), _sum(history, "step_time"), _sum(epochs, "eval_time")
    loop = float(metrics.get("wall_time_s") or 0.0)
    parts = {
        "kernel": kernel,
        "imports": imports,
        "setup": train_cell - loop,
        "data": data,
        "steps": steps,
        "eval": evaluation,
        "loop_other": loop - data - steps - evaluation,
        "after": total - kernel - imports - train_cell,
    }
    overhead = parts["kernel"] + parts["imports"] + parts["after"]
    return {
        "cell": run_dir.name,
        "total_s": total,
        **{f"{k}_s": v for k, v in parts.items()},
        "papermill_overhead_s": overhead,
        "papermill_overhead_percent": 100.0 * overhead / total,
        "steps_logged": len(history),
        "resumed": total < loop,
    }


def measure_overhead(repeats: int = 3, steps: int = 4) -> dict:
    """Seconds a cell costs through papermill beyond the same cell from the command line.

    Runs one short demo cell (``steps`` steps, one evaluation, on a small generated
    demo set) three ways, taking turns, ``repeats`` times each (the best of each is kept):
    ``clipstudy.study.cells.run_cell`` (papermill, as the sweep runs a cell); the same with the
    kernel shut down politely (papermill's default, what the sweep did before); and
    ``python -m clipstudy train``. The difference is per cell and does not depend on the
    cell's length.
    """
    import functools
    import subprocess
    import tempfile
    import time
    from unittest import mock

    import papermill

    def graceful(execute, *args, **kwargs):
        kwargs["shutdown_kernel"] = "graceful"
        return execute(*args, **kwargs)

    from clipstudy.data.demo import make_demo_data
    from clipstudy.study.cells import run_cell
    from clipstudy.study.sweep import plan_cells

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_demo_data(
            tmp / "data",
            seed=0,
            image_size=32,
            train_size=256,
            retrieval_size=20,
            zeroshot_per_class=2,
            zeroshot_classes=5,
        )
        fields = {"data": str(tmp / "data"), "max_steps": steps, "epochs": 1, "threads": 1}
        times = {"papermill": [], "papermill, graceful kernel shutdown": [], "command line": []}
        for r in range(repeats):
            for variant in ("papermill", "papermill, graceful kernel shutdown"):
                cell = plan_cells(
                    "demo",
                    optimizers=["adamw"],
                    losses=["clip"],
                    overrides=fields,
                    runs_root=tmp / f"{variant[:14]}{r}",
                )[0]
                patch = (
                    mock.patch.object(
                        papermill, "execute_notebook", functools.partial(graceful, papermill.execute_notebook)
                    )
                    if "graceful" in variant
                    else contextlib.nullcontext()
                )
                with patch:
                    metrics = run_cell(cell)
                if metrics.get("status") != "completed":
                    raise RuntimeError(f"the papermill cell did not complete: {metrics}")
                times[variant].append(metrics["sweep_wall_s"])
            args = [
                sys.executable,
                "-m",
                "clipstudy",
                "train",
                "--profile",
                "demo",
                "--no-progress",
                "--out",
                str(tmp / f"cli{r}"),
                "--optimizer",
                "adamw",
                "--loss",
                "clip",
            ]
            args += [f"--{k}={v}" for k, v in fields.items()]
            start = time.perf_counter()
            subprocess.run(args, check=True, capture_output=True, cwd=REPO)
            times["command line"].append(time.perf_counter() - start)
    papermill, cli = min(times["papermill"]), min(times["command line"])
    graceful_s = min(times["papermill, graceful kernel shutdown"])
    return {
        "steps": steps,
        "repeats": repeats,
        "papermill_s": papermill,
        "command_line_s": cli,
        "overhead_s": papermill - cli,
        "papermill_graceful_shutdown_s": graceful_s,
        "overhead_graceful_shutdown_s": graceful_s - cli,
        "all_s": times,
    }


def run(
    quick: bool = False,
    out: str | Path | None = DEFAULT_OUT,
    runs: str | Path = DEFAULT_RUNS,
    measure: bool | None = None,
) -> dict:
    """Break down every executed cell under ``runs``.

    Unless ``quick`` (or ``measure=False``), also measures papermill's cost per cell
    directly (:func:`measure_overhead`) and relates it to the mean cell's wall time.
    """
    runs = Path(runs)
    rows = [r for r in (cell_breakdown(d) for d in sorted(runs.glob("*")) if d.is_dir()) if r is not None]
    results = {"benchmark": "sweep", "runs": str(runs), "goal_overhead_percent": GOAL_PERCENT, "cells": rows}
    if rows:
        total = sum(r["total_s"] for r in rows)
        results["mean"] = {f"{k}_s": sum(r[f"{k}_s"] for r in rows) / len(rows) for k in PARTS + ("total",)}
        results["share_percent"] = {k: 100.0 * sum(r[f"{k}_s"] for r in rows) / total for k in PARTS}
        results["papermill_overhead_percent"] = 100.0 * sum(r["papermill_overhead_s"] for r in rows) / total
        if measure if measure is not None else not quick:
            measured = measure_overhead()
            measured["percent_of_mean_cell"] = 100.0 * measured["overhead_s"] / results["mean"]["total_s"]
            measured["percent_of_mean_cell_graceful_shutdown"] = (
                100.0 * measured["overhead_graceful_shutdown_s"] / results["mean"]["total_s"]
            )
            results["measured_overhead"] = measured
        write_json(results, out)
    return results


def print_results(results: dict) -> None:
    if not results["cells"]:
        print(
            f"sweep breakdown: no executed, completed cell under {results['runs']} "
            "(run `make demo` first); nothing to report"
        )
        return
    print(f"demo sweep: wall time per cell ({len(results['cells'])} cells under {results['runs']}), seconds")
    columns = [("cell", "cell", "{}"), ("total_s", "total", "{:.1f}")]
    columns += [(f"{k}_s", k.replace("_", " "), "{:.1f}") for k in PARTS]
    columns += [("papermill_overhead_percent", "papermill %", "{:.1f}")]
    print(
        table(
            results["cells"]
            + [
                {"cell": "mean", **results["mean"], "papermill_overhead_percent": results["papermill_overhead_percent"]}
            ],
            columns,
        )
    )
    print(
        "share of all cells' wall time: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}%" for k, v in results["share_percent"].items())
    )
    print(
        f"notebook-side time (kernel + imports + after; an upper bound on papermill's cost, since the "
        f"imports include torch's): {results['papermill_overhead_percent']:.1f}% "
        f"(goal < {results['goal_overhead_percent']:.0f}%)"
    )
    m = results.get("measured_overhead")
    if m:
        print(
            f"measured side by side, one {m['steps']}-step demo cell (best of {m['repeats']}): papermill "
            f"{m['papermill_s']:.1f} s, command line {m['command_line_s']:.1f} s: papermill adds "
            f"{m['overhead_s']:.1f} s per cell = {m['percent_of_mean_cell']:.1f}% of the mean cell above "
            f"(goal < {results['goal_overhead_percent']:.0f}%)"
        )
        print(
            f"  before (papermill's polite kernel shutdown): {m['papermill_graceful_shutdown_s']:.1f} s, "
            f"+{m['overhead_graceful_shutdown_s']:.1f} s = {m['percent_of_mean_cell_graceful_shutdown']:.1f}% "
            "of the mean cell"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(DEFAULT_RUNS), help="folder of run directories (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="only read the run directories (no measured cell)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(args.quick, args.out, args.runs)
    print_results(results)
    if results["cells"]:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
