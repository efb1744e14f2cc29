"""What running a cell through submitit's local executor costs against the inline sweep, side by side.

The same short demo cells (``--steps`` optimizer steps on a small synthetic
data set, one torch thread) run through ``clipstudy.study.sweep.run_sweep`` (inline:
papermill from this process) and through ``clipstudy.study.executors.run_local``
(each cell a submitit job: a controller process, a task process that unpickles
the cell and runs the same papermill cell, results pickled back), alternating
between the two, ``--repeats`` times. Each variant's wall time per cell is the
sweep's wall time over its cells; the overhead is local minus inline. Also
reported: the part of each cell spent outside ``run_cell`` (starting and
collecting the job), which is what the executor itself adds; the rest of the
difference is the fresh process importing papermill and the machine's noise.

Usage: ``python benchmarks/bench_executors.py [--steps N] [--cells N] [--repeats N]``; writes
``reports/benchmarks/executors.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, table, write_json  # noqa: E402

DEFAULT_OUT = OUT_DIR / "executors.json"
LOSSES = ("clip", "sogclr", "cyclip", "vicreg")


def one_sweep(variant: str, data: Path, runs: Path, steps: int, cells: int) -> tuple[float, float]:
    """(wall seconds per cell, seconds per cell inside ``run_cell``) of one sweep of ``cells`` fresh cells."""
    from clipstudy.study import executors
    from clipstudy.study.sweep import plan_cells, run_sweep

    planned = plan_cells(
        "demo",
        optimizers=["adamw"],
        losses=LOSSES[:cells],
        runs_root=runs,
        overrides={"data": str(data), "max_steps": steps, "epochs": 1, "threads": 1},
    )
    start = time.perf_counter()
    if variant == "inline":
        results = run_sweep(planned, jobs=1, progress=False)
    else:
        results = executors.run_local(planned, executors.Resources(), runs / ".submitit", jobs=1)
    wall = time.perf_counter() - start
    bad = {name: m.get("status") for name, m in results.items() if m.get("status") != "completed"}
    if bad or len(results) != cells:
        raise RuntimeError(f"{variant}: cells did not complete: {bad}")
    return wall / cells, sum(m["sweep_wall_s"] for m in results.values()) / cells


def run(steps: int = 5, cells: int = 2, repeats: int = 2, out: str | Path | None = DEFAULT_OUT) -> dict:
    from clipstudy.data.demo import make_demo_data

    times: dict[str, list[float]] = {"inline": [], "local": []}
    inside: dict[str, list[float]] = {"inline": [], "local": []}
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
        for r in range(repeats):
            order = ("inline", "local") if r % 2 == 0 else ("local", "inline")
            for variant in order:
                wall, in_cell = one_sweep(variant, tmp / "data", tmp / f"{variant}{r}", steps, cells)
                times[variant].append(wall)
                inside[variant].append(in_cell)
    inline, local = min(times["inline"]), min(times["local"])
    results = {
        "benchmark": "executors",
        "steps": steps,
        "cells": cells,
        "repeats": repeats,
        "per_cell_s": times,
        "inside_run_cell_s": inside,
        "outside_run_cell_s": {v: [w - i for w, i in zip(times[v], inside[v])] for v in times},
        "inline_s": inline,
        "local_s": local,
        "overhead_s": local - inline,
        "overhead_percent": 100.0 * (local - inline) / inline,
        "median_overhead_s": statistics.median(times["local"]) - statistics.median(times["inline"]),
    }
    write_json(results, out)
    return results


def print_results(results: dict) -> None:
    rows = [
        {
            "variant": v,
            "best": min(t),
            "median": statistics.median(t),
            "all": " ".join(f"{x:.1f}" for x in t),
            "outside": statistics.median(results["outside_run_cell_s"][v]),
        }
        for v, t in results["per_cell_s"].items()
    ]
    print(
        f"{results['cells']} demo cells of {results['steps']} steps per sweep, {results['repeats']} sweeps per "
        "variant, alternating; wall seconds per cell:"
    )
    print(
        table(
            rows,
            [
                ("variant", "executor", "{}"),
                ("best", "best", "{:.1f}"),
                ("median", "median", "{:.1f}"),
                ("all", "each sweep", "{}"),
                ("outside", "outside run_cell (median)", "{:.2f}"),
            ],
        )
    )
    print(
        f"local executor overhead: {results['overhead_s']:+.1f} s per cell (best vs best) = "
        f"{results['overhead_percent']:+.1f}% of an inline cell; medians: {results['median_overhead_s']:+.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cells", type=int, default=2, choices=range(1, len(LOSSES) + 1))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(args.steps, args.cells, args.repeats, args.out)
    print_results(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
