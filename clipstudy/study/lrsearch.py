"""Choose one learning rate for every optimizer, as the original study used one (2e-4) for all.

``python -m clipstudy choose-lr --profile demo`` trains each optimizer with
one loss (CLIP) and one seed at every candidate rate, through the sweep
machinery (resumable, ``--jobs`` at a time), into
``reports/runs/<profile>-lr/``. The chosen rate maximises the Average
*averaged over the optimizers*, so no optimizer's preference decides alone;
a tie goes to the smaller rate. The table and the choice are written to
``reports/<profile>/lr_search.csv`` and printed; the profile's ``lr`` is then
set to the choice by hand (``clipstudy/engine/config.py``), once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from clipstudy import paths
from clipstudy.engine.config import ConfigError
from clipstudy.study.sweep import plan_cells, run_sweep

DEFAULT_RATES = (1e-4, 3e-4, 1e-3, 3e-3)


def rate_label(optimizer: str, lr: float) -> str:
    return f"{optimizer}-lr{lr:g}"


def plan_search(profile: str, rates, optimizers, loss: str, seed: int, overrides: dict, runs_root: Path):
    variants = {rate_label(o, lr): {"optimizer": o, "lr": float(lr)} for o in optimizers for lr in rates}
    return plan_cells(
        profile,
        optimizers=list(variants),
        losses=[loss],
        seeds=[seed],
        overrides=overrides,
        variants=variants,
        runs_root=runs_root,
    )


def search_table(results: dict[str, dict], rates, optimizers, loss: str, seed: int) -> pd.DataFrame:
    """Average per rate (rows) and optimizer (columns), plus their mean; NaN where a run did not complete."""
    from clipstudy.engine.config import cell_name

    table = pd.DataFrame(index=pd.Index([float(r) for r in rates], name="lr"), columns=list(optimizers), dtype=float)
    for o in optimizers:
        for lr in rates:
            m = results.get(cell_name(rate_label(o, lr), loss, seed), {})
            if m.get("status") == "completed" and "average" in m:
                table.loc[float(lr), o] = float(m["average"])
    table["mean"] = table[list(optimizers)].mean(axis=1, skipna=False)
    return table


def choose_rate(table: pd.DataFrame) -> float:
    """The rate with the highest mean Average over optimizers (ties: the smaller rate)."""
    means = table["mean"].dropna()
    if means.empty:
        raise ValueError("no rate has a completed run for every optimizer")
    best = means.max()
    return float(min(lr for lr, value in means.items() if value == best))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipstudy choose-lr", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--data", default="data/demo", help="demo-layout data folder")
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES))
    parser.add_argument("--optimizers", default="adamw,sgd,adam")
    parser.add_argument("--loss", default="clip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        raise ConfigError(f"--rates {args.rates!r}: give a comma list of numbers, e.g. 3e-4,1e-3") from None
    optimizers = [o for o in args.optimizers.split(",") if o]
    runs_root = paths.runs_dir(f"{args.profile}-lr")
    cells = plan_search(
        args.profile, rates, optimizers, args.loss, args.seed, {"data": str(Path(args.data).resolve())}, runs_root
    )
    runs_root.mkdir(parents=True, exist_ok=True)
    table = search_table(run_sweep(cells, jobs=args.jobs), rates, optimizers, args.loss, args.seed)
    out = paths.reports_dir(args.profile) / "lr_search.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out)
    print(table.round(2).to_string())
    try:
        print(
            f"chosen lr (highest mean Average over {', '.join(optimizers)} with {args.loss}, seed {args.seed}): "
            f"{choose_rate(table):g}; written {out}"
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
