"""One cell of the study: its plan (:class:`Cell`), its state on disk, and running it through the notebook.

A cell is one optimizer (or variant) x loss x seed. :func:`run_cell` executes
``notebooks/train.ipynb`` with papermill into the cell's run directory under the
cell's lock; every executor (inline, local, Slurm) runs cells through it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipstudy import paths
from clipstudy.engine import records
from clipstudy.engine.checkpoint import checkpoint_paths
from clipstudy.engine.config import ConfigError, RunConfig, cell_name, notebook_parameters
from clipstudy.engine.fingerprint import describe_change, fingerprint
from clipstudy.fileio import SWEEP_LOCK_NAME, CellBusy, cell_lock, is_locked
from clipstudy.study.notebooks import execute_notebook

STALE_FOLDER = "stale"  # <runs>/stale/<cell>-<time>: archived stale runs (the report reads <runs>/*/ only)


@dataclass
class Cell:
    label: str  # optimizer label (an optimizer name or a variant name)
    loss: str
    seed: int
    out: Path = Path()
    config: RunConfig | None = None  # the validated configuration the cell runs

    @property
    def name(self) -> str:
        return cell_name(self.label, self.loss, self.seed)


def cell_state(out: Path, config: RunConfig | None = None) -> tuple[str, str]:
    """(state, detail) of a run directory: done, diverged, stale, failed, interrupted, running, partial or pending.

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
        if status == records.INTERRUPTED:  # stopped by a signal: resumes (on requeue, or at the next sweep)
            return "interrupted", f"resumes from {ckpts[0].name}" if ckpts else "no checkpoint yet: starts afresh"
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


def parse_settings(items: list[str]) -> dict[str, str]:
    """``--set FIELD=VALUE`` items -> {field: value}, each split at its first "=" (a JSON value may hold "="
    and ","); a field name is checked when the configuration is made."""
    settings = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set: {item!r} is not FIELD=VALUE (e.g. --set epochs=4)")
        settings[name.strip()] = value.strip()
    return settings


def parse_mapping(text: str | None, what: str) -> dict[str, str]:
    """``"a=1,b=2"`` -> {"a": "1", "b": "2"}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"{what}: {item!r} is not NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def run_config(cell: Cell, device: str | None, threads: int | None) -> RunConfig:
    """The configuration a cell runs: the one the sweep validated, on the executor's device, with the
    executor's share of the cores unless the cell sets ``threads`` itself."""
    changes = {"device": device} if device else {}
    if threads and not cell.config.threads:
        changes["threads"] = threads
    return dataclasses.replace(cell.config, **changes)


def run_cell(
    cell: Cell,
    *,
    device: str | None = None,
    threads: int | None = None,
    notebook: Path | None = None,
    trainer: Callable[[RunConfig], None] | None = None,
) -> dict:
    """Execute the training notebook for one cell (or, with ``trainer``, hand the cell's configuration to it:
    tuning trials, which need no notebook); return its metrics (or the failure).

    The cell's sweep lock is held throughout, so a second sweep on the same
    folder skips the cell (status ``busy``) instead of training it twice.
    """
    cell.out.mkdir(parents=True, exist_ok=True)
    try:
        with cell_lock(cell.out, SWEEP_LOCK_NAME):
            if record_state(cell.out, cell.config)[0] in ("done", "diverged"):  # finished while we waited
                return {**records.read_metrics(cell.out), "sweep_wall_s": 0.0, "skipped": True}
            return _run_cell_locked(cell, device, threads, notebook or paths.notebook("train.ipynb"), trainer)
    except CellBusy:
        return {"status": "busy", "cell": cell.name, "sweep_wall_s": 0.0}


class TrainerInterrupted(Exception):
    """A trainer's run stopped by a signal (it checkpointed first): a KeyboardInterrupt from a worker process."""


def _run_cell_locked(cell: Cell, device, threads, notebook, trainer=None) -> dict:
    started = time.perf_counter()
    error = stopped = None
    before = records.read_metrics(cell.out)  # an earlier attempt's record, if any
    try:
        config = run_config(cell, device, threads)
        if trainer is not None:
            trainer(config)
        else:
            # once every cell has run, nothing is left to lose (train() has written its files
            # atomically): ending the kernel at once saves the ~2 s a kernel with torch loaded
            # takes to exit politely
            parameters = notebook_parameters(config)
            execute_notebook(notebook, cell.out / "train.ipynb", parameters, shutdown_kernel="immediate")
    except Exception as err:  # papermill wraps the notebook's exception
        stopped = interruption(err)
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    metrics = records.read_metrics(cell.out) or {}
    recorded_now = metrics.get("status") == records.FAILED and metrics != before
    if error and not recorded_now and metrics.get("status") not in records.FINISHED:
        # the notebook failed before train() could record it (a bad parameter, missing data), or left
        # an earlier attempt's failure, or a signal stopped it (training checkpointed first: an
        # interruption, not a failure); a result train() finished before the kernel went down is
        # kept, never overwritten
        metrics = cell_record(cell, records.INTERRUPTED, note=stopped) if stopped else cell_record(cell, error=error)
        records.write_metrics(cell.out, metrics)
    metrics["sweep_wall_s"] = time.perf_counter() - started
    return metrics


_SCHEDULER_STOP = {"note": ""}  # set in a job's process once the scheduler has asked its cell to stop


def scheduler_stopping(note: str) -> None:
    """Say that the scheduler is stopping this process's cell (submitit calls the task's ``checkpoint`` from its
    signal handler, then requeues): whatever the notebook raises from then on is that stop, not a failure. (The
    handler runs in the thread that waits for the notebook, so its own errors surface there: ``scontrol
    requeue`` killed by the SIGTERM of the very requeue it asked for, for one.)"""
    _SCHEDULER_STOP["note"] = note


def interruption(err: Exception) -> str:
    """Why the notebook stopped when a signal stopped it (training checkpoints on SIGTERM / SIGINT / SIGUSR2 and
    raises KeyboardInterrupt; submitit raises UncompletedJobError when it will not requeue); "" for a failure."""
    if type(err).__name__ == "UncompletedJobError" and "not requeued" in str(err):
        return f"stopped by the scheduler and not requeued ({str(err).strip()}); the next sweep resumes it"
    if _SCHEDULER_STOP["note"]:
        return _SCHEDULER_STOP["note"]
    if isinstance(err, TrainerInterrupted):
        return f"stopped by a signal: {str(err).strip() or 'interrupted'}"
    if getattr(err, "ename", "") == "KeyboardInterrupt":  # papermill's error names the kernel's exception
        return f"stopped by a signal: {str(getattr(err, 'evalue', '')).strip() or 'interrupted'}"
    return ""


def cell_record(cell: Cell, status: str = records.FAILED, *, error: str = "", note: str = "") -> dict:
    """metrics.json of a cell that did not finish: failed (with the error) or interrupted (with a note)."""
    metrics = records.failure_metrics(
        cell=cell.name,
        profile=cell.config.profile,
        optimizer=cell.label,
        base_optimizer=cell.config.optimizer,
        loss=cell.loss,
        seed=cell.seed,
        error=error,
    )
    if status != records.FAILED:
        del metrics["error"]
        metrics.update(status=status, note=note)
    return metrics


def summary_line(cell: Cell, metrics: dict) -> str:
    status = metrics.get("status", "?")
    wall = metrics.get("sweep_wall_s", 0.0)
    if metrics.get("skipped"):  # another sweep finished it while this one waited for it
        return f"{cell.name:<28} skipped (done by another sweep)"
    if status == "completed":
        scores = " ".join(f"{k}={metrics[k]:.2f}" for k in records.HEADLINE if isinstance(metrics.get(k), (int, float)))
        return f"{cell.name:<28} completed  {scores}  ({wall:.0f}s)"
    if status == "diverged":
        return f"{cell.name:<28} DIVERGED at step {metrics.get('diverged_at_step')}  ({wall:.0f}s)"
    if status == "busy":
        return f"{cell.name:<28} skipped (another sweep is running it)"
    if status == "stale":
        return f"{cell.name:<28} NOT RUN: stale ({metrics.get('detail')})"
    if status == records.INTERRUPTED:
        return f"{cell.name:<28} interrupted, checkpoint kept ({metrics.get('note', '')})  ({wall:.0f}s)"
    return f"{cell.name:<28} FAILED: {metrics.get('error', '')}  ({wall:.0f}s)"
