"""Run the optimizer x loss grid by executing ``notebooks/train.ipynb`` with papermill.

Each cell runs into ``reports/runs/<profile>/<label>-<loss>-s<seed>/`` with
its executed notebook beside the run's outputs. The sweep is resumable: a
finished (completed or diverged) cell is skipped, an interrupted cell
resumes from its newest checkpoint, a failed cell is recorded and the sweep
goes on (it is tried again on the next sweep). A cell whose lock is held by
another live process is skipped, so two sweeps on one folder never train the
same cell twice.

A cell is *done* only when its recorded fingerprint (:mod:`clipstudy.fingerprint`)
matches what the sweep asks for. A cell run with other settings or data is
*stale*: it is listed with what changed, and not run unless ``--rerun-stale``,
which first moves the old run to ``<runs>/stale/<cell>-<time>``.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from clipstudy import executors, paths, records
from clipstudy.checkpoint import SWEEP_LOCK_NAME, CellBusy, cell_lock, checkpoint_paths, is_locked
from clipstudy.config import (FIELDS, PROFILES, ConfigError, RunConfig, cell_name, fields_epilog, make_config,
                              profile_named_in)
from clipstudy.fingerprint import describe_change, fingerprint, listings_cached

STALE_FOLDER = "stale"  # <runs>/stale/<cell>-<time>: archived stale runs (the report reads <runs>/*/ only)

DEFAULT_OPTIMIZERS = ("adamw", "sgd", "adam")
DEFAULT_LOSSES = ("clip", "sogclr", "cyclip", "vicreg", "onlineclr")
# Named optimizer variants beyond the original grid; more with --variant.
VARIANTS: dict[str, dict] = {
    "adam-nol2": {"optimizer": "adam", "weight_decay": 0.0},  # Adam without its L2 penalty
    # the initialisation ablation: the same cells from random towers instead of pretrained ones
    **{f"{name}-scratch": {"optimizer": name, "pretrained": False} for name in DEFAULT_OPTIMIZERS},
}


@dataclass
class Cell:
    label: str                 # optimizer label (an optimizer name or a variant name)
    loss: str
    seed: int
    params: dict = field(default_factory=dict)   # papermill parameters
    out: Path = Path()
    config: RunConfig | None = None              # the validated configuration the cell runs

    @property
    def name(self) -> str:
        return cell_name(self.label, self.loss, self.seed)


def cell_state(out: Path, config: RunConfig | None = None) -> tuple[str, str]:
    """(state, detail) of a run directory: done, diverged, stale, failed, running, partial or pending.

    With ``config`` (what the sweep asks for) a run that recorded another
    fingerprint is ``stale`` (the detail names what changed), and a run cut
    by ``max_steps`` earlier than ``config`` asks is ``partial`` (it continues).
    """
    if is_locked(out) or is_locked(out, SWEEP_LOCK_NAME):
        return "running", "locked by a live process"
    return record_state(out, config)


def record_state(out: Path, config: RunConfig | None = None) -> tuple[str, str]:
    """:func:`cell_state` from the run's records alone (the caller holds or ignores the locks)."""
    m = records.read_metrics(out)
    ckpts = checkpoint_paths(out / "checkpoints")
    if config is not None and (records.is_finished(m) or ckpts):
        change = describe_change(records.recorded_fingerprint(out), fingerprint(config))
        if change:
            return "stale", change
    if m is not None:
        status = m.get("status")
        note = records.progress_note(m)
        if status == records.COMPLETED and config is not None and not records.is_complete_for(m, config.max_steps):
            return "partial", f"{note}; continues"  # not complete for config: cut, so note is never empty
        if status == records.COMPLETED:
            score = f"average {m['average']:.2f}" if isinstance(m.get("average"), (int, float)) else "completed"
            return "done", f"{score}, {note}" if note else score
        if status == records.DIVERGED:
            return "diverged", f"at step {m.get('diverged_at_step')}"
        if status == records.FAILED:
            return "failed", m.get("error", "")[:120]
    if ckpts:
        return "partial", f"resumes from {ckpts[0].name}"
    return "pending", ""


def archive_stale(out: Path) -> Path:
    """Move a stale run directory to ``<runs>/stale/<cell>-<UTC time>`` (never deleted); return where."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = out.parent / STALE_FOLDER / f"{out.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = out.parent / STALE_FOLDER / f"{out.name}-{stamp}-{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    out.rename(target)
    return target


def parse_mapping(text: str | None, what: str) -> dict[str, str]:
    """``"a=1,b=2"`` -> {"a": "1", "b": "2"}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"{what}: {item!r} is not NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def plan_cells(profile: str, *, optimizers=DEFAULT_OPTIMIZERS, losses=DEFAULT_LOSSES, seeds=(0,),
               lr: dict[str, float] | float | None = None, overrides: dict | None = None,
               variants: dict[str, dict] | None = None, runs_root: str | Path | None = None) -> list[Cell]:
    """The cells of a sweep, each validated now (so a bad parameter fails before hours of training).

    ``lr`` is one learning rate for every cell or a mapping optimizer label -> lr.
    ``variants`` adds named optimizer variants to :data:`VARIANTS`.
    """
    known = {**VARIANTS, **(variants or {})}
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
                if isinstance(lr, dict):
                    if label in lr:
                        params["lr"] = float(lr[label])
                elif lr:
                    params["lr"] = float(lr)
                cell = Cell(label, loss, int(seed))
                cell.out = root / cell.name
                params["out"] = str(cell.out)
                cell.config = make_config(profile, **params)  # validate now
                cell.params = {"profile": profile, **params}
                cells.append(cell)
    return cells


def check_sweep_inputs(cells: list[Cell]) -> None:
    """Data and weights of every cell are there, checked once per distinct setting before any kernel starts."""
    from clipstudy.models import weights_needed
    from clipstudy.preflight import check_inputs

    seen = set()
    for cell in cells:
        key = (tuple(sorted(cell.config.resolved_paths().items())), tuple(sorted(weights_needed(cell.config).items())))
        if key not in seen:
            seen.add(key)
            check_inputs(cell.config)


def check_names(lr: dict | float | None, variants: dict[str, dict]) -> None:
    """Every ``--lr`` key names an optimizer or a variant, every ``--variant`` a known optimizer and fields."""
    from clipstudy.optim import available_optimizers

    optimizers = available_optimizers()
    for name, variant in variants.items():
        if variant.get("optimizer") not in optimizers:
            raise ConfigError(f"--variant {name}: optimizer {variant.get('optimizer')!r} is unknown; "
                              f"valid optimizers: {optimizers}")
        unknown = [key for key in variant if key.replace("-", "_") not in FIELDS]
        if unknown:
            raise ConfigError(f"--variant {name}: unknown config field(s) {unknown}; valid fields: {sorted(FIELDS)}")
    if isinstance(lr, dict):
        known = sorted({*optimizers, *VARIANTS, *variants})
        for name in lr:
            if name not in known:
                raise ConfigError(f"--lr: {name!r} is not an optimizer or variant name; valid names: {known}")


def notebook_parameters(cell: Cell, device: str | None, threads: int | None) -> dict:
    """Papermill parameters of the training notebook for one cell."""
    params = dict(cell.params)
    profile = params.pop("profile")
    base = {k: params.pop(k) for k in ("optimizer", "loss", "seed", "out", "data", "label") if k in params}
    overrides = dict(params)
    if device:
        overrides["device"] = device
    if threads:
        overrides["threads"] = threads
    return {"profile": profile, **base, "overrides": overrides, "progress": False}


def run_cell(cell: Cell, *, device: str | None = None, threads: int | None = None,
             notebook: Path | None = None) -> dict:
    """Execute the training notebook for one cell; return its metrics (or the failure).

    The cell's sweep lock is held throughout, so a second sweep on the same
    folder skips the cell (status ``busy``) instead of training it twice.
    """
    cell.out.mkdir(parents=True, exist_ok=True)
    try:
        with cell_lock(cell.out, SWEEP_LOCK_NAME):
            if record_state(cell.out, cell.config)[0] in ("done", "diverged"):  # finished while we waited
                return {**records.read_metrics(cell.out), "sweep_wall_s": 0.0, "skipped": True}
            return _run_cell_locked(cell, device, threads, notebook or paths.notebook("train.ipynb"))
    except CellBusy:
        return {"status": "busy", "cell": cell.name, "sweep_wall_s": 0.0}


def local_socket_kernel_manager(folder: str):
    """A Jupyter kernel manager whose kernel talks over Unix sockets in ``folder``.

    The default TCP transport picks free ports by probing, which parallel cells
    (``--jobs N``) can race for, and makes every kernel log an "unencrypted TCP"
    warning; sockets in a private folder avoid both.
    """
    from jupyter_client import AsyncKernelManager

    class LocalSocketKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=os.path.join(folder, "kernel"), **kwargs)

    return LocalSocketKernelManager


def execute_notebook(notebook: Path, output: Path, parameters: dict, **kwargs) -> None:
    """Run ``notebook`` with papermill into ``output`` as clipstudy does everywhere.

    The kernel runs from the project root (the output's folder for an installed
    clipstudy; no path depends on it) and talks over Unix sockets in a
    private temporary folder (:func:`local_socket_kernel_manager`); other keyword
    arguments go to ``papermill.execute_notebook``.
    """
    import shutil
    import tempfile

    import papermill

    # a short path: a Unix socket's name is limited to ~100 characters, run folders may be deeper
    sockets = tempfile.mkdtemp(prefix="clipstudy-kernel-")
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                                   progress_bar=False, cwd=str(_kernel_directory(output)),
                                   kernel_manager_class=local_socket_kernel_manager(sockets), **kwargs)
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


def _kernel_directory(output: Path) -> Path:
    root = paths.checkout_root()
    return root if root is not None else Path(output).resolve().parent


def _run_cell_locked(cell: Cell, device, threads, notebook) -> dict:
    started = time.perf_counter()
    error = None
    before = records.read_metrics(cell.out)  # an earlier attempt's record, if any
    try:
        # once every cell has run, nothing is left to lose (train() has written its files
        # atomically): ending the kernel at once saves the ~2 s a kernel with torch loaded
        # takes to exit politely
        execute_notebook(notebook, cell.out / "train.ipynb", notebook_parameters(cell, device, threads),
                         shutdown_kernel="immediate")
    except Exception as err:  # papermill wraps the notebook's exception
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    metrics = records.read_metrics(cell.out) or {}
    recorded_now = metrics.get("status") == records.FAILED and metrics != before
    if error and not recorded_now and metrics.get("status") not in records.FINISHED:
        # the notebook failed before train() could record it (a bad parameter, missing data), or left
        # an earlier attempt's failure; a result train() finished before the kernel went down is
        # kept, never overwritten as failed
        metrics = records.failure_metrics(
            cell=cell.name, profile=cell.params["profile"], optimizer=cell.label,
            base_optimizer=cell.params.get("optimizer", cell.label), loss=cell.loss, seed=cell.seed, error=error)
        records.write_metrics(cell.out, metrics)
    metrics["sweep_wall_s"] = time.perf_counter() - started
    return metrics


def summary_line(cell: Cell, metrics: dict) -> str:
    status = metrics.get("status", "?")
    wall = metrics.get("sweep_wall_s", 0.0)
    if metrics.get("skipped"):  # another sweep finished it while this one waited for it
        return f"{cell.name:<28} skipped (done by another sweep)"
    if status == "completed":
        scores = " ".join(f"{k}={metrics[k]:.2f}" for k in records.HEADLINE
                          if isinstance(metrics.get(k), (int, float)))
        return f"{cell.name:<28} completed  {scores}  ({wall:.0f}s)"
    if status == "diverged":
        return f"{cell.name:<28} DIVERGED at step {metrics.get('diverged_at_step')}  ({wall:.0f}s)"
    if status == "busy":
        return f"{cell.name:<28} skipped (another sweep is running it)"
    if status == "stale":
        return f"{cell.name:<28} NOT RUN: stale ({metrics.get('detail')})"
    return f"{cell.name:<28} FAILED: {metrics.get('error', '')}  ({wall:.0f}s)"


def unfinished_cells(cells: list[Cell], rerun_stale: bool = False) -> tuple[dict[str, dict], list[Cell]]:
    """(metrics of the finished cells, the cells left to run); says why each skipped cell is skipped.

    A stale cell is not run (its result is ``{"status": "stale", "detail": ...}``)
    unless ``rerun_stale``: then its run directory is archived
    (:func:`archive_stale`) and the cell runs afresh.
    """
    results, todo = {}, []
    with listings_cached():
        states = [cell_state(cell.out, cell.config) for cell in cells]
    for cell, (state, detail) in zip(cells, states):
        if state in ("done", "diverged"):
            print(f"{cell.name:<28} skipped ({state}{': ' + detail if detail else ''})", flush=True)
            results[cell.name] = records.read_metrics(cell.out)
        elif state == "running":
            print(f"{cell.name:<28} skipped (running in another process)", flush=True)
        elif state == "stale" and not rerun_stale:
            results[cell.name] = {"status": "stale", "cell": cell.name, "detail": detail}
            print(summary_line(cell, results[cell.name]), flush=True)
        else:
            if state == "stale":
                print(f"{cell.name:<28} stale ({detail}): old run moved to {archive_stale(cell.out)}", flush=True)
            todo.append(cell)
    return results, todo


def run_sweep(cells: list[Cell], *, jobs: int = 1, progress: bool = True,
              rerun_stale: bool = False) -> dict[str, dict]:
    """Run every unfinished cell, ``jobs`` at a time; return cell name -> metrics (stale cells:
    see :func:`unfinished_cells`)."""
    import torch
    from tqdm.auto import tqdm

    results, todo = unfinished_cells(cells, rerun_stale)
    gpus = torch.cuda.device_count()
    devices: queue.Queue = queue.Queue()
    for slot in range(jobs):
        devices.put(f"cuda:{slot % gpus}" if gpus else None)
    threads = None if gpus else max(1, (os.cpu_count() or 1) // jobs)

    def work(cell: Cell) -> dict:
        device = devices.get()
        try:
            return run_cell(cell, device=device, threads=threads if jobs > 1 else None)
        finally:
            devices.put(device)

    bar = tqdm(total=len(todo), desc="sweep", unit="cell", disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, cell): cell for cell in todo}
        for future in as_completed(futures):
            cell = futures[future]
            metrics = future.result()
            results[cell.name] = metrics
            bar.update(1)
            tqdm.write(summary_line(cell, metrics), file=sys.stdout)
    bar.close()
    return results


def _number(text: str, option: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a{'n integer' if kind is int else ' number'}") from None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipstudy sweep",
                                     description="Run the optimizer x loss grid through papermill.",
                                     epilog=fields_epilog(profile_named_in(argv, "demo")),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                        help=f"comma list; optimizer names or variants {sorted(VARIANTS)}")
    parser.add_argument("--losses", default=",".join(DEFAULT_LOSSES),
                        help="comma list of losses (default: the original five; isogclr and siglip run only "
                             "when named)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds, e.g. 0,1,2")
    parser.add_argument("--lr", default=None,
                        help="one learning rate for all cells, or per optimizer or variant name: "
                             "adamw=2e-4,sgd=0.05 (an unknown name fails at start)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIMIZER[:FIELD=VALUE;...]",
                        help="a named optimizer variant, e.g. sgd-hi=sgd:lr=0.1;weight_decay=0")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a configuration field for every cell (repeatable)")
    parser.add_argument("--data", default=None, help="demo-layout data folder (sets the `data` field)")
    parser.add_argument("--runs", default=None, help="runs folder (default reports/runs/<profile>)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "1")))
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    executors.add_arguments(parser)
    parser.add_argument("--rerun-stale", action="store_true",
                        help="rerun cells trained with other settings or data, moving each old run to "
                             "RUNS/stale/CELL-TIME first (without it they are listed and not run)")
    args = parser.parse_args(argv)
    cells = plan_from_args(args)
    resources = executors.resources_from_args(args)
    if args.status:
        with listings_cached():
            executors.print_status(cells)
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
            raise ConfigError(f"--runs {root}: cannot create the runs folder ({err.strerror or err}); "
                              "choose a folder you can write to") from None
    t0 = time.perf_counter()
    if args.executor == "inline" and resources.world_size == 1:
        results = run_sweep(cells, jobs=args.jobs, rerun_stale=args.rerun_stale)
    else:
        results, todo = unfinished_cells(cells, rerun_stale=args.rerun_stale)
        ran = executors.run_cells(args.executor, todo, resources, cells[0].out.parent if cells else Path(),
                                  jobs=args.jobs, wait=args.wait)
        if ran is None:  # submitted to Slurm, not waited for
            return 0
        results.update(ran)
    counts: dict[str, int] = {}
    for m in results.values():
        counts[m.get("status", "?")] = counts.get(m.get("status", "?"), 0) + 1
    print(f"sweep finished in {time.perf_counter() - t0:.0f}s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    failed = counts.get(records.FAILED, 0)
    if failed:  # a diverged cell is a result; a failed one is not
        print(f"{failed} cell(s) failed: see the FAILED lines above and each cell's metrics.json and "
              "train.ipynb; rerun the same command to retry them", file=sys.stderr)
    if counts.get("stale"):
        print(f"error: {counts['stale']} stale cell(s) not run: their runs used other settings or data (listed "
              "above). Rerun with --rerun-stale to archive and retrain them, or keep both results side by side "
              "with a --variant (see README, \"Several settings side by side\")", file=sys.stderr)
    return 1 if failed or counts.get("stale") else 0


def plan_from_args(args) -> list[Cell]:
    """The sweep's cells from its command line, every name and value checked (ConfigError otherwise)."""
    overrides = {}
    for item in args.set:
        overrides.update(parse_mapping(item, "--set"))
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
    if args.lr:
        lr = ({k: _number(v, "--lr", float) for k, v in parse_mapping(args.lr, "--lr").items()}
              if "=" in args.lr else _number(args.lr, "--lr", float))
    check_names(lr, variants)
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    return plan_cells(args.profile, optimizers=[o for o in args.optimizers.split(",") if o],
                      losses=[x for x in args.losses.split(",") if x],
                      seeds=[_number(s, "--seeds", int) for s in args.seeds.split(",") if s], lr=lr,
                      overrides=overrides, variants=variants, runs_root=args.runs)
