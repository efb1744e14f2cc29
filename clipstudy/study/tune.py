"""``python -m clipstudy tune``: an equal-budget learning-rate search for every optimizer, scored on validation.

The protocol follows the optimizer-benchmarking literature (AlgoPerf's external
tuning, DeepOBS, Dodge et al. 2019):

* every optimizer gets the same number of trials: a log-spaced grid over its
  documented search space (its registry entry's ``search_lr``, half a decade
  apart, both ends in); ``--weight-decays`` adds a second axis;
* a trial is an ordinary run (resumable, fingerprinted, cached: rerunning
  ``tune`` reruns nothing) with ``evaluate_test=False``, so the test sets are
  never opened; it is scored by its validation Average (``val_average``) at the
  end of training, on tuning seeds (1000 and up) that no reported run uses;
* a group's rate is the best mean score over its trials (seeds, and losses when
  one rate serves several); a best rate at an end of the grid extends the grid
  half a decade past that end until the best is inside (bracketed) or
  ``--max-extensions`` is reached, which the table says;
* groups are optimizers (``tuned`` protocol, one rate per optimizer over the
  losses tuned on) or optimizer x loss (``--per-loss``); the ``shared`` rate is
  the one of the rates every optimizer tried with the best mean over optimizers,
  with CLIP when groups are per loss (the original study's protocol: one rate
  for all).

Trials run in ``reports/runs/<profile>-tune/``; the table of every trial goes to
``reports/<profile>/tuning.csv`` (the ``tuned`` and ``shared`` columns mark the
choices) and ``sweep --lr-from`` reads it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from clipstudy import paths
from clipstudy.arguments import CommandParser
from clipstudy.engine.config import ConfigError
from clipstudy.study.cells import parse_settings
from clipstudy.study.tuning_table import write_table

TUNING_SEED = 1000  # tuning seeds start here; reported runs use 0, 1, 2, ...
SCORE = "val_average"
COLUMNS = ["group", "optimizer", "loss", "lr", "weight_decay", "seed", "status", SCORE, "run_dir"]


def lattice(k: int) -> float:
    """The ``k``-th rate of the half-decade lattice 10^(k/2) (4 significant digits), e.g. k=-6 -> 0.001."""
    return float(f"{10 ** (k / 2):.4g}")


def lattice_index(rate: float) -> int:
    return round(2 * math.log10(rate))


def lr_grid(low: float, high: float) -> list[float]:
    """Rates of the half-decade lattice from ``low`` to ``high``, both ends included (rounded onto the lattice)."""
    if not 0 < low <= high:
        raise ValueError(f"search space ({low}, {high}): needs 0 < low <= high")
    return [lattice(k) for k in range(lattice_index(low), lattice_index(high) + 1)]


def extend(grid: list[float], best: float, limit: tuple[float, float] = (1e-7, 10.0)) -> float | None:
    """The next rate past the end of ``grid`` where ``best`` lies, or None when ``best`` is inside (or at a limit)."""
    rates = sorted(grid)
    if best == rates[-1] and lattice(lattice_index(best) + 1) <= limit[1]:
        return lattice(lattice_index(best) + 1)
    if best == rates[0] and lattice(lattice_index(best) - 1) >= limit[0]:
        return lattice(lattice_index(best) - 1)
    return None


def trial_label(optimizer: str, lr: float, weight_decay: float | None) -> str:
    return f"{optimizer}-lr{lr:g}" + ("" if weight_decay is None else f"-wd{weight_decay:g}")


def group_of(optimizer: str, loss: str, per_loss: bool) -> str:
    return f"{optimizer}:{loss}" if per_loss else optimizer


def group_scores(trials: pd.DataFrame) -> pd.DataFrame:
    """Per group and setting (lr, weight decay): the mean validation Average over its trials.

    A trial that diverged or failed scores -inf, so a rate that breaks any
    trial is never chosen over one that completes.
    """
    score = trials[SCORE].where(trials["status"] == "completed", -np.inf).fillna(-np.inf)
    return trials.assign(score=score).groupby(["group", "lr", "weight_decay"], as_index=False)["score"].mean()


def best_settings(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per group: its best (lr, weight decay); ties go to the smaller rate, then the smaller decay."""
    ordered = scores.sort_values(["group", "score", "lr", "weight_decay"], ascending=[True, False, True, True])
    return ordered.groupby("group", as_index=False).first()


def shared_rate(scores: pd.DataFrame, optimizers: list[str], loss: str = "clip") -> float | None:
    """The rate, among those every optimizer tried, with the best mean score over optimizers (ties: smaller).

    With one group per optimizer x loss, the optimizers' ``loss`` groups decide (the original protocol:
    one rate for all, chosen with CLIP); the best weight decay of each rate counts.
    """
    groups = scores["group"]
    if groups.str.contains(":").any():
        scores = scores[groups.str.endswith(f":{loss}")]
    per_optimizer = scores.assign(optimizer=scores["group"].str.split(":").str[0])
    by_rate = per_optimizer.groupby(["optimizer", "lr"])["score"].max().unstack("optimizer")
    # the asked optimizers first, then their common rates: another optimizer's rates must not drop any
    common = by_rate[[o for o in optimizers if o in by_rate.columns]].dropna()
    if common.empty or common.shape[1] < len(optimizers):
        return None
    means = common.mean(axis=1)
    return float(min(means.index[means == means.max()]))


def plan_trials(profile, grids: dict, losses, seeds, weight_decays, per_loss: bool, overrides: dict, runs_root):
    """``[(group, cell)]``: the trial cells of every group's grid (ordinary sweep cells; see :func:`trial_label`)."""
    from clipstudy.study.sweep import plan_cells

    planned = []
    for group, rates in grids.items():
        optimizer = group.split(":")[0]
        group_losses = [group.split(":")[1]] if per_loss else losses
        variants = {
            trial_label(optimizer, lr, wd): {
                "optimizer": optimizer,
                "lr": lr,
                **({} if wd is None else {"weight_decay": wd}),
            }
            for lr in rates
            for wd in weight_decays
        }
        trial_overrides = {**overrides, "evaluate_test": False}  # tuning never opens the test sets
        for cell in plan_cells(
            profile,
            optimizers=list(variants),
            losses=group_losses,
            seeds=seeds,
            overrides=trial_overrides,
            variants=variants,
            runs_root=runs_root,
        ):
            planned.append((group, cell))
    return planned


def trial_table(planned, results: dict[str, dict]) -> pd.DataFrame:
    rows = []
    for group, cell in planned:
        metrics = results.get(cell.name) or {}
        rows.append(
            {
                "group": group,
                "optimizer": cell.config.optimizer,
                "loss": cell.loss,
                "lr": cell.config.lr,
                "weight_decay": cell.config.weight_decay,
                "seed": cell.seed,
                "status": metrics.get("status", "missing"),
                SCORE: metrics.get(SCORE),
                "run_dir": str(cell.out),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def tune(
    profile: str,
    optimizers: list[str],
    losses: list[str],
    *,
    per_loss: bool = False,
    seeds=(TUNING_SEED,),
    weight_decays=(None,),
    overrides: dict | None = None,
    runs_root: Path,
    jobs: int = 1,
    max_extensions: int = 2,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """Run the search; return the table of every trial (choices marked) and a summary per group."""
    from clipstudy.core.optim import OPTIMIZERS
    from clipstudy.study.sweep import run_sweep

    if any(seed < TUNING_SEED for seed in seeds):
        raise ConfigError(f"--seeds: tuning seeds start at {TUNING_SEED}, apart from the reported runs' seeds")
    grids = {
        group_of(o, loss, per_loss): lr_grid(*OPTIMIZERS[o].search_lr)
        for o in optimizers
        for loss in (losses if per_loss else losses[:1])
    }
    budget = {group: len(rates) for group, rates in grids.items()}  # equal for every optimizer by construction
    extensions = dict.fromkeys(grids, 0)
    _prepare_towers(profile, grids, losses, seeds, weight_decays, per_loss, overrides or {}, runs_root, progress)
    while True:
        planned = plan_trials(profile, grids, losses, seeds, weight_decays, per_loss, overrides or {}, runs_root)
        trials = trial_table(
            planned, run_sweep([cell for _, cell in planned], jobs=jobs, progress=progress, notebooks=False)
        )
        best = best_settings(group_scores(trials)).set_index("group")
        grew = False
        for group, rates in grids.items():
            past = extend(rates, best.loc[group, "lr"])
            if past is not None and extensions[group] < max_extensions:
                rates.append(past)
                extensions[group] += 1
                grew = True
        if not grew:
            break
    scores = group_scores(trials)
    best = best_settings(scores).set_index("group")
    shared = shared_rate(scores, optimizers)
    trials["tuned"] = [
        row.lr == best.loc[row.group, "lr"] and row.weight_decay == best.loc[row.group, "weight_decay"]
        for row in trials.itertuples()
    ]
    trials["shared"] = trials["lr"] == shared if shared is not None else False
    summary = {
        group: {
            "lr": float(best.loc[group, "lr"]),
            "weight_decay": float(best.loc[group, "weight_decay"]),
            "score": float(best.loc[group, "score"]),
            "trials": budget[group] + extensions[group],
            "base_budget": budget[group],
            "bracketed": extend(grids[group], best.loc[group, "lr"]) is None,
        }
        for group in grids
    }
    return trials, {"groups": summary, "shared_lr": shared}


def _prepare_towers(profile, grids, losses, seeds, weight_decays, per_loss, overrides, runs_root, progress) -> None:
    """Build the demo's pretrained towers before any trial, if the trials use them.

    The towers are part of every model's initialisation, made once per data set; their disjointness
    check reads every split (test included) only to keep it out of pretraining. Made here, outside the
    trials, the trials themselves only load them and never open a test file.
    """
    from clipstudy.engine.pretrain import ensure_pretrained, uses_pretrained_towers

    _, cell = plan_trials(profile, grids, losses, seeds, weight_decays, per_loss, overrides, runs_root)[0]
    if any(uses_pretrained_towers(cell.config)):
        ensure_pretrained(cell.config, progress=progress)


def print_summary(summary: dict, path: Path) -> None:
    for group, row in summary["groups"].items():
        edge = "" if row["bracketed"] else " (NOT bracketed: best at the end of the grid after the last extension)"
        print(
            f"{group:<20} lr {row['lr']:<8g} validation Average {row['score']:6.2f}  "
            f"{row['trials']} settings ({row['base_budget']} in the base grid){edge}"
        )
    shared = summary["shared_lr"]
    print(f"shared rate (best mean over optimizers): {shared:g}" if shared else "no rate common to every optimizer")
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="python -m clipstudy tune",
        description="Equal-budget learning-rate search per optimizer, scored on the validation sets only.",
    )
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--data", default=None, help="demo-layout data folder (sets the `data` field)")
    parser.add_argument("--optimizers", default="", help="comma list (default: the default grid's)")
    parser.add_argument("--losses", default="clip", help="losses the rates are tuned on (default clip)")
    parser.add_argument("--per-loss", action="store_true", help="one rate per optimizer x loss, not per optimizer")
    parser.add_argument("--seeds", default=str(TUNING_SEED), help=f"tuning seeds, >= {TUNING_SEED} (comma list)")
    parser.add_argument("--weight-decays", default="", help="optional second axis, e.g. 0,0.02,0.1")
    parser.add_argument("--max-extensions", type=int, default=2, help="grid extensions per group to bracket the best")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a field for every trial")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs", default=None, help="trials folder (default reports/runs/<profile>-tune)")
    parser.add_argument("--out", default=None, help="tuning table (default reports/<profile>/tuning.csv)")
    args = parser.parse_args(argv)
    from clipstudy.core.optim import default_grid_optimizers

    def numbers(text: str, option: str, kind) -> list:
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise ConfigError(f"{option} {text!r}: give a comma list of numbers") from None

    overrides = parse_settings(args.set)
    if args.data:
        overrides["data"] = str(Path(args.data).resolve())
    optimizers = [o for o in args.optimizers.split(",") if o] or default_grid_optimizers()
    losses = [x for x in args.losses.split(",") if x]
    weight_decays = tuple(numbers(args.weight_decays, "--weight-decays", float)) or (None,)
    runs_root = Path(args.runs).resolve() if args.runs else paths.runs_dir(f"{args.profile}-tune")
    trials, summary = tune(
        args.profile,
        optimizers,
        losses,
        per_loss=args.per_loss,
        seeds=numbers(args.seeds, "--seeds", int),
        weight_decays=weight_decays,
        overrides=overrides,
        runs_root=runs_root,
        jobs=args.jobs,
        max_extensions=args.max_extensions,
    )
    out = Path(args.out) if args.out else paths.reports_dir(args.profile) / "tuning.csv"
    write_table(trials, out)
    print_summary(summary, out)
    return 0 if all(m == "completed" for m in trials["status"]) else 1
