"""The fair benchmark end to end: ``python -m clipstudy study`` (``make study``).

One command runs what a fair comparison of optimizers needs (docs/protocol.md,
"Fair comparison"):

1. ``tune`` (:mod:`clipstudy.study.tune`): the same number of learning-rate
   trials for every optimizer, on tuning seeds (1000 and up), scored on the
   validation sets; the test sets are never opened.
2. The final runs of two protocols, side by side, on fresh reporting seeds
   (0, 1, ... none used in tuning), each in its own folder of the profile's
   runs folder:

   * ``shared``: one learning rate for every optimizer (the original study's
     protocol), the rate every optimizer tried with the best mean validation
     Average;
   * ``tuned``: each optimizer x loss at its own best rate, the same budget
     each (``--per-optimizer``: one rate per optimizer).

   A ``tuned`` cell whose rate equals the shared one is the same run: it is
   linked, not trained twice.
3. The report (``reports/<profile>/``), with both protocols and the tuning curves.

Every run is an ordinary, resumable, fingerprinted run: rerunning ``study``
trains only what is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from clipstudy import paths
from clipstudy.arguments import CommandParser
from clipstudy.engine.config import ConfigError
from clipstudy.paths import PROTOCOLS
from clipstudy.study.cells import parse_settings

# one validation pass, after the last epoch (which is always evaluated), for trials and final runs alike
VALIDATE_AT_THE_END = {"eval_every": 1000}


def protocol_cells(profile: str, protocol: str, rates: dict[str, float], *, seeds, overrides: dict, runs_root: Path):
    """The cells of one protocol: the default grid at the protocol's rates, in ``runs_root/<protocol>/``."""
    from clipstudy.study.sweep import plan_cells

    return plan_cells(profile, seeds=seeds, lr=rates, overrides=overrides, runs_root=runs_root / protocol)


def link_shared_runs(tuned: list, shared: list) -> int:
    """Link each tuned cell to the shared cell of the same configuration (same rate); return how many."""
    from clipstudy.engine.fingerprint import fingerprint

    by_digest = {fingerprint(cell.config)["digest"]: cell for cell in shared}
    linked = 0
    for cell in tuned:
        twin = by_digest.get(fingerprint(cell.config)["digest"])
        if twin is not None and not cell.out.exists():
            cell.out.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(twin.out, cell.out.parent), cell.out)
            linked += 1
    return linked


def run_study(
    profile: str,
    *,
    seeds,
    data: str | None,
    jobs: int,
    tuning_losses: list[str],
    per_loss: bool,
    overrides: dict,
    protocols=PROTOCOLS,
    tuning_from: str | None = None,
    out: str | None = None,
    report: bool = True,
    notebooks: bool = False,
) -> dict:
    """Tune (or read a tuning table), run the protocols, render the report; return what each step did
    and how long it took."""
    from clipstudy.study import tune, tuning_table
    from clipstudy.study.sweep import run_sweep

    if any(seed >= tune.TUNING_SEED for seed in seeds):
        raise ConfigError(f"--seeds: reporting seeds stay below {tune.TUNING_SEED}, apart from the tuning seeds")
    overrides = {**overrides, **({"data": str(Path(data).resolve())} if data else {})}
    runs_root = paths.runs_dir(profile)
    reports = Path(out).resolve() if out else paths.reports_dir(profile)
    timings, started = {}, time.perf_counter()
    summary = None
    table = Path(tuning_from).resolve() if tuning_from else reports / "tuning.csv"
    if tuning_from is None:
        from clipstudy.core.optim import default_grid_optimizers

        trials, summary = tune.tune(
            profile,
            default_grid_optimizers(),
            tuning_losses,
            per_loss=per_loss,
            overrides={**overrides, **VALIDATE_AT_THE_END},  # a trial is judged at its end
            runs_root=paths.runs_dir(f"{profile}-tune"),
            jobs=jobs,
        )
        tuning_table.write_table(trials, table)
        tune.print_summary(summary, table)
        timings["tune_s"] = time.perf_counter() - started
    results = {}
    cells_by_protocol = {}
    for protocol in protocols:
        t0 = time.perf_counter()
        rates = tuning_table.rates_from(table, protocol)
        # selection is over (tuning chose on validation): a final run scores validation once at its end, beside
        # the test sets, instead of after every epoch (two of its four evaluation passes in the demo)
        final = {**VALIDATE_AT_THE_END, **overrides}
        cells = protocol_cells(profile, protocol, rates, seeds=seeds, overrides=final, runs_root=runs_root)
        cells_by_protocol[protocol] = cells
        if protocol == "tuned" and "shared" in cells_by_protocol:
            print(f"tuned: {link_shared_runs(cells, cells_by_protocol['shared'])} cells are the shared protocol's runs")
        results[protocol] = run_sweep(cells, jobs=jobs, notebooks=notebooks)
        timings[f"{protocol}_s"] = time.perf_counter() - t0
    if report:
        from clipstudy.study.report import render

        t0 = time.perf_counter()
        render(profile, runs_root, reports)  # every protocol folder there, also those of earlier studies
        timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    return {"tuning": summary, "results": results, "timings": timings}


def main(argv: list[str]) -> int:
    parser = CommandParser(
        prog="python -m clipstudy study",
        description="The fair benchmark: tune every optimizer (equal budgets, validation only), run the shared and "
        "the tuned protocol on fresh seeds, render the report.",
    )
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--data", default=None, help="data folder (sets the `data` field)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="reporting seeds (default 0-4; never tuning seeds)")
    parser.add_argument(
        "--tuning-losses", default="", help="losses the rates are tuned on (default: every loss of the grid)"
    )
    parser.add_argument(
        "--per-optimizer",
        action="store_true",
        help="tune one rate per optimizer over the tuning losses (default: one per optimizer x loss)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells at a time (one torch thread each when > 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a field for every run")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma list of shared, tuned (default both)")
    parser.add_argument(
        "--tuning-from",
        default=None,
        help="use this tuning table (e.g. the committed reports/demo/tuning.csv); no tuning",
    )
    parser.add_argument("--out", default=None, help="report folder (default reports/<profile>)")
    parser.add_argument("--no-report", action="store_true", help="run everything, render no report")
    parser.add_argument(
        "--notebooks",
        action="store_true",
        help="run each final run through the training notebook, kept executed in its run folder (about 10 s "
        "more per demo run); default: train them in worker processes, as the tuning trials",
    )
    args = parser.parse_args(argv)
    from clipstudy.core.losses import default_grid_losses

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give a comma list of integers") from None
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"--protocols: unknown {unknown}; choose from {list(PROTOCOLS)}")
    overrides = parse_settings(args.set)
    outcome = run_study(
        args.profile,
        seeds=seeds,
        data=args.data,
        jobs=args.jobs,
        tuning_losses=[x for x in args.tuning_losses.split(",") if x] or default_grid_losses(),
        per_loss=not args.per_optimizer,
        overrides=overrides,
        protocols=protocols,
        tuning_from=args.tuning_from,
        out=args.out,
        report=not args.no_report,
        notebooks=args.notebooks,
    )
    timings = outcome["timings"]
    print("study finished: " + ", ".join(f"{k.removesuffix('_s')} {v / 60:.1f} min" for k, v in timings.items()))
    failed = [name for runs in outcome["results"].values() for name, m in runs.items() if m.get("status") == "failed"]
    return 1 if failed else 0
