"""Run the optimizer x loss grid by executing ``notebooks/train.ipynb`` with papermill.

Each cell runs into ``reports/runs/<profile>/<label>-<loss>-s<seed>/`` with
its executed notebook beside the run's outputs. The sweep is resumable: a
finished (completed or diverged) cell is skipped, an interrupted cell
resumes from its newest checkpoint, a failed cell is recorded and the sweep
goes on (it is tried again on the next sweep). A cell whose lock is held by
another live process is skipped, so two sweeps on one folder never train the
same cell twice.

A cell is *done* only when its recorded fingerprint (:mod:`clipstudy.engine.fingerprint`)
matches what the sweep asks for. A cell run with other settings or data is
*stale*: it is listed with what changed, and not run unless ``--rerun-stale``,
which first moves the old run to ``<runs>/stale/<cell>-<time>``.
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from clipstudy import paths
from clipstudy.arguments import CommandParser
from clipstudy.engine import records
from clipstudy.engine.config import FIELDS, PROFILES, ConfigError, fields_epilog, make_config, profile_named_in
from clipstudy.engine.fingerprint import listings_cached
from clipstudy.engine.preflight import check_components
from clipstudy.study import executors, jobs, resources, sweep_manifest
from clipstudy.study.cells import Cell, archive_stale, cell_state, parse_mapping, parse_settings, run_cell, summary_line


def plan_cells(
    profile: str,
    *,
    optimizers=None,
    losses=None,
    seeds=(0,),
    lr: dict[str, float] | float | None = None,
    overrides: dict | None = None,
    variants: dict[str, dict] | None = None,
    runs_root: str | Path | None = None,
) -> list[Cell]:
    """The cells of a sweep, each validated now (so a bad parameter fails before hours of training).

    ``optimizers`` and ``losses`` default to the registered entries marked for the default grid.
    ``lr`` is one learning rate for every cell or a mapping to rates from ``label:loss``, ``label`` or ``*``
    (the most specific wins; a tuning table's choices, :func:`clipstudy.study.tune.rates_from`).
    ``variants`` adds named optimizer variants to :data:`~clipstudy.study.variants.VARIANTS`.
    """
    from clipstudy.core.losses import default_grid_losses
    from clipstudy.core.optim import default_grid_optimizers
    from clipstudy.study.variants import VARIANTS  # here, not at the top: `sweep --help` imports no torch

    optimizers = optimizers or default_grid_optimizers()
    losses = losses or default_grid_losses()
    known = {**{label: v.fields for label, v in VARIANTS.items()}, **(variants or {})}
    root = Path(runs_root).resolve() if runs_root else paths.runs_dir(profile)
    overrides = dict(overrides or {})
    cells = []
    for label in optimizers:
        variant = known.get(label, {"optimizer": label})
        for loss in losses:
            for seed in seeds:
                params = {**overrides, **variant, "loss": loss, "seed": int(seed)}
                if label in known:
                    params["label"] = label
                if isinstance(lr, dict):  # the most specific rate: label x loss, label, then every cell
                    key = next((k for k in (f"{label}:{loss}", label, "*") if k in lr), None)
                    if key is not None:
                        params["lr"] = float(lr[key])
                elif lr:
                    params["lr"] = float(lr)
                cell = Cell(label, loss, int(seed))
                cell.out = root / cell.name
                params["out"] = str(cell.out)
                cell.config = make_config(profile, **params)  # validated now, handed to the notebook as it is
                check_components(cell.config)
                cells.append(cell)
    return cells


def check_sweep_inputs(cells: list[Cell]) -> None:
    """Data and weights of every cell are there, checked once per distinct setting before any kernel starts."""
    from clipstudy.core.models import weights_needed
    from clipstudy.engine.preflight import check_inputs

    seen = set()
    for cell in cells:
        key = (tuple(sorted(cell.config.resolved_paths().items())), tuple(sorted(weights_needed(cell.config).items())))
        if key not in seen:
            seen.add(key)
            check_inputs(cell.config)


def check_names(lr: dict | float | None, variants: dict[str, dict]) -> None:
    """Every ``--lr`` key names an optimizer or a variant, every ``--variant`` a known optimizer and fields."""
    from clipstudy.core.optim import available_optimizers
    from clipstudy.study.variants import VARIANTS

    optimizers = available_optimizers()
    for name, variant in variants.items():
        if variant.get("optimizer") not in optimizers:
            raise ConfigError(
                f"--variant {name}: optimizer {variant.get('optimizer')!r} is unknown; valid optimizers: {optimizers}"
            )
        unknown = [key for key in variant if key.replace("-", "_") not in FIELDS]
        if unknown:
            raise ConfigError(f"--variant {name}: unknown config field(s) {unknown}; valid fields: {sorted(FIELDS)}")
    if isinstance(lr, dict):
        known = sorted({*optimizers, *VARIANTS, *variants})
        for name in lr:
            if name != "*" and name.split(":")[0] not in known:
                raise ConfigError(f"--lr: {name!r} is not an optimizer or variant name; valid names: {known}")


def unfinished_cells(
    cells: list[Cell], rerun_stale: bool = False, keep_running: bool = False
) -> tuple[dict[str, dict], list[Cell]]:
    """(metrics of the finished cells, the cells left to run); says why each skipped cell is skipped.

    A stale cell is not run (its result is ``{"status": "stale", "detail": ...}``)
    unless ``rerun_stale``: then its run directory is archived
    (:func:`archive_stale`) and the cell runs afresh. A running cell is left out
    unless ``keep_running`` (Slurm: its job is looked up, and waited for with ``--wait``).
    """
    results, todo = {}, []
    with listings_cached():
        states = [cell_state(cell.out, cell.config) for cell in cells]
    for cell, (state, detail) in zip(cells, states):
        if state in ("done", "diverged"):
            print(f"{cell.name:<28} skipped ({state}{': ' + detail if detail else ''})", flush=True)
            results[cell.name] = records.read_metrics(cell.out)
        elif state == "running" and not keep_running:
            print(f"{cell.name:<28} skipped (running in another process)", flush=True)
        elif state == "stale" and not rerun_stale:
            results[cell.name] = {"status": "stale", "cell": cell.name, "detail": detail}
            print(summary_line(cell, results[cell.name]), flush=True)
        else:
            if state == "stale":
                print(f"{cell.name:<28} stale ({detail}): old run moved to {archive_stale(cell.out)}", flush=True)
            todo.append(cell)
    return results, todo


def train_in_worker(config) -> None:
    """Train one cell in a worker process of :func:`run_sweep` (``notebooks=False``); a signal's stop (train()
    checkpoints first) comes back as :class:`~clipstudy.study.cells.TrainerInterrupted`."""
    from clipstudy.engine.train import train
    from clipstudy.study.cells import TrainerInterrupted

    try:
        train(config, progress=False)
    except KeyboardInterrupt as err:
        raise TrainerInterrupted(str(err) or "interrupted") from None


def run_sweep(
    cells: list[Cell], *, jobs: int = 1, progress: bool = True, rerun_stale: bool = False, notebooks: bool = True
) -> dict[str, dict]:
    """Run every unfinished cell, ``jobs`` at a time; return cell name -> metrics (stale cells:
    see :func:`unfinished_cells`).

    ``notebooks=False`` (tuning trials) trains each cell in one of ``jobs`` long-lived worker processes
    instead of executing the training notebook: the same ``train()`` on the same configuration, hence the
    same run directory and numbers, without a kernel start and the imports per cell (about 10 s of a demo
    cell's 40 s).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    from tqdm.auto import tqdm

    results, todo = unfinished_cells(cells, rerun_stale)
    gpus = torch.cuda.device_count()
    devices: queue.Queue = queue.Queue()
    for slot in range(jobs):
        devices.put(f"cuda:{slot % gpus}" if gpus else None)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // jobs)
    workers = None
    if not notebooks and todo:  # spawned: a fresh interpreter, as a notebook kernel is (no forked torch state)
        workers = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def trainer(config) -> None:
        workers.submit(train_in_worker, config).result()

    def work(cell: Cell) -> dict:
        device = devices.get()
        try:
            return run_cell(
                cell, device=device, threads=threads if jobs > 1 else None, trainer=trainer if workers else None
            )
        finally:
            devices.put(device)

    bar = tqdm(total=len(todo), desc="sweep", unit="cell", disable=not progress, file=sys.stderr)
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = {pool.submit(work, cell): cell for cell in todo}
    try:
        for future in as_completed(futures):
            cell = futures[future]
            metrics = future.result()
            results[cell.name] = metrics
            bar.update(1)
            tqdm.write(summary_line(cell, metrics), file=sys.stdout)
    except KeyboardInterrupt:
        _stop(pool, futures)
        raise KeyboardInterrupt(
            "sweep stopped: queued cells were not started, running ones checkpointed; rerun the same command to "
            "resume them"
        ) from None
    finally:
        bar.close()
        if workers is not None:
            workers.shutdown(cancel_futures=True)
    pool.shutdown()
    return results


def _stop(pool: ThreadPoolExecutor, futures: dict) -> None:
    """Ctrl-C reaches the sweep only (each notebook kernel runs in a session of its own): queued cells never
    start, and the running kernels are asked to checkpoint and stop (SIGTERM), as on a scheduler's signal."""
    import signal

    for future in futures:
        future.cancel()
    for pid in executors.child_pids(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    pool.shutdown(wait=True)


def _number(text: str, option: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m clipstudy sweep",
        description="Run the optimizer x loss grid through papermill. The options a sweep ran with are remembered "
        "in its runs folder (sweep.json): --status, --dry-run and a rerun of that folder need only --runs "
        "(or --profile for the default folder).",
        epilog=fields_epilog(profile_named_in(argv, "demo")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cell_options(parser)
    parser.add_argument("--data", default=None, help="demo-layout data folder (sets the `data` field)")
    parser.add_argument("--runs", default=None, help="runs folder (default reports/runs/<profile>)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "1")))
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    resources.add_arguments(parser)
    parser.add_argument(
        "--rerun-stale",
        action="store_true",
        help="rerun cells trained with other settings or data, moving each old run to "
        "RUNS/stale/CELL-TIME first (without it they are listed and not run)",
    )
    return parser


def add_cell_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which cells the sweep runs and with which settings."""
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument(
        "--optimizers",
        default="",
        help="comma list of optimizer or variant names (default: the default grid; `python -m clipstudy list` "
        "shows every name)",
    )
    parser.add_argument(
        "--losses",
        default="",
        help="comma list of losses (default: the default grid, the original five; `python -m clipstudy list`)",
    )
    parser.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    parser.add_argument(
        "--lr",
        default=None,
        help="one learning rate for all cells, or per optimizer or variant name: "
        "adamw=2e-4,sgd=0.05 (an unknown name fails at start)",
    )
    parser.add_argument(
        "--lr-from",
        default=None,
        metavar="TUNING_CSV",
        help="the rates a tuning table chose (python -m clipstudy tune), e.g. reports/demo/tuning.csv",
    )
    parser.add_argument(
        "--protocol",
        choices=("tuned", "shared"),
        default="tuned",
        help="with --lr-from: each optimizer's (x loss's) own rate, or the one shared rate (default tuned)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OPTIMIZER[:FIELD=VALUE;...]",
        help="a named optimizer variant, e.g. sgd-hi=sgd:lr=0.1;weight_decay=0",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a configuration field for every cell, one per --set (repeatable); "
        'JSON values may hold commas: --set \'loss_params={"gamma":0.9,"estimator":"exact"}\'',
    )


def remembered_settings(parser, args, argv: list[str]) -> tuple[set[str], list[dict]]:
    """Fill the options ``argv`` does not give from the runs folder's sweep.json (saying so); return the options
    given and the remembered sweeps."""
    given = sweep_manifest.given_options(parser, argv)
    folder = sweep_manifest.runs_folder(args)
    remembered = sweep_manifest.read(folder)
    if remembered:
        defaults = {action.dest: action.default for action in parser._actions}
        taken = sweep_manifest.fill(args, given, remembered[-1], defaults)
        if taken:
            print(f"settings from {folder / sweep_manifest.MANIFEST} (the last sweep there): {shlex.join(taken)}")
    return given, remembered


def described_cells(args, given: set[str], remembered: list[dict]) -> list[Cell]:
    """The cells --status and --dry-run describe: those of the options given, or (none of the cell options
    given) those of every sweep remembered in the runs folder, the latest plan of a cell winning."""
    if len(remembered) < 2 or given & set(sweep_manifest.PLANNING):
        return plan_from_args(args)
    cells: dict[str, Cell] = {}
    for settings in remembered:
        for cell in plan_from_args(argparse.Namespace(**{**vars(args), **settings})):
            cells.pop(cell.name, None)
            cells[cell.name] = cell
    return list(cells.values())


def main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    given, remembered = remembered_settings(parser, args, argv)
    cells = described_cells(args, given, remembered) if args.status or args.dry_run else plan_from_args(args)
    needs = resources.resources_from_args(args)
    if args.status:
        with listings_cached():
            jobs.print_status(cells)
        return 0
    if args.dry_run:
        with listings_cached():
            for cell in cells:
                state, detail = cell_state(cell.out, cell.config)
                print(f"{cell.name:<28} {state}{f' ({detail})' if detail else ''}")
        print(f"{len(cells)} cells in {cells[0].out.parent if cells else '-'}")
        return 0
    check_sweep_inputs(cells)
    if cells:
        root = cells[0].out.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"--runs {root}: cannot create the runs folder ({err.strerror or err}); "
                "choose a folder you can write to"
            ) from None
        sweep_manifest.write(root, args)
    t0 = time.perf_counter()
    if args.executor == "inline" and needs.world_size == 1:
        results = run_sweep(cells, jobs=args.jobs, rerun_stale=args.rerun_stale)
    else:
        results, todo = unfinished_cells(cells, args.rerun_stale, keep_running=args.executor == "slurm")
        ran = executors.run_cells(
            args.executor, todo, needs, cells[0].out.parent if cells else Path(), jobs=args.jobs, wait=args.wait
        )
        if ran is None:  # submitted to Slurm, not waited for
            return 0
        results.update(ran)
    return finish(results, time.perf_counter() - t0)


def finish(results: dict[str, dict], seconds: float) -> int:
    """The sweep's closing lines; exit status 1 when a cell failed, was interrupted or is stale."""
    counts: dict[str, int] = {}
    for m in results.values():
        counts[m.get("status", "?")] = counts.get(m.get("status", "?"), 0) + 1
    print(f"sweep finished in {seconds:.0f}s: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    failed, interrupted = counts.get(records.FAILED, 0), counts.get(records.INTERRUPTED, 0)
    if failed:  # a diverged cell is a result; a failed one is not
        print(
            f"{failed} cell(s) failed: see the FAILED lines above and each cell's metrics.json and "
            "train.ipynb; rerun the same command to retry them",
            file=sys.stderr,
        )
    if interrupted:
        print(
            f"{interrupted} cell(s) interrupted and not requeued, each with its checkpoint: rerun the same "
            "command to resume them",
            file=sys.stderr,
        )
    if counts.get("stale"):
        print(
            f"error: {counts['stale']} stale cell(s) not run: their runs used other settings or data (listed "
            "above). Rerun with --rerun-stale to archive and retrain them, or keep both results side by side "
            'with a --variant (see docs/user-guide.md, "Several settings side by side")',
            file=sys.stderr,
        )
    return 1 if failed or interrupted or counts.get("stale") else 0


def plan_from_args(args) -> list[Cell]:
    """The sweep's cells from its command line, every name and value checked (ConfigError otherwise)."""
    overrides = parse_settings(args.set)
    for name in overrides:
        if name.replace("-", "_") not in FIELDS:
            raise ConfigError(f"--set: unknown config field {name!r}; valid fields: {sorted(FIELDS)}")
    if args.data:
        overrides["data"] = str(Path(args.data).resolve())
    variants = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        optimizer, _, fields = rest.partition(":")
        variants[name] = {"optimizer": optimizer, **parse_mapping(fields.replace(";", ","), "--variant")}
    lr = None
    if args.lr and args.lr_from:
        raise ConfigError("--lr and --lr-from both set the learning rates: give one of them")
    if args.lr_from:
        from clipstudy.study.tuning_table import rates_from

        lr = rates_from(args.lr_from, args.protocol)
    if args.lr:
        lr = (
            {k: _number(v, "--lr", float) for k, v in parse_mapping(args.lr, "--lr").items()}
            if "=" in args.lr
            else _number(args.lr, "--lr", float)
        )
    check_names(lr, variants)
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    return plan_cells(
        args.profile,
        optimizers=[o for o in args.optimizers.split(",") if o],
        losses=[x for x in args.losses.split(",") if x],
        seeds=[_number(s, "--seeds", int) for s in args.seeds.split(",") if s],
        lr=lr,
        overrides=overrides,
        variants=variants,
        runs_root=args.runs,
    )
