"""What a run records, in one place: statuses, ``metrics.json``, the CSV logs, provenance.

* Status values of a run (:data:`COMPLETED`, :data:`DIVERGED`, :data:`FAILED`,
  :data:`INTERRUPTED`); a run is *finished* when completed or diverged.
* ``metrics.json``: built by :func:`run_metrics` (a training run) or
  :func:`failure_metrics` (a run that failed), written by :func:`write_metrics`
  and read by :func:`read_metrics`, the only writer and reader.
* :data:`HEADLINE`: the study's four headline scores, in report order.
* Provenance: :func:`git_commit`, :func:`package_versions`, :func:`device_description`;
  a run's ``config.json`` and ``metrics.json`` record the same commit (the one it started with).
* :func:`run_summary`: one line for a person (where the run is, how it ended, how long it took, its scores).
* :class:`RunLog`: the training loop's ``history.csv`` (one row per logged
  step, :meth:`RunLog.log_step`) and ``epochs.csv`` (one row per evaluation,
  :meth:`RunLog.log_epoch`). Anything that should see every row (a TensorBoard
  writer, extra diagnostics) hooks in there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path

from clipstudy import __version__, paths
from clipstudy.engine.environment import lock_versions
from clipstudy.fileio import atomic_write_text, write_json

COMPLETED, DIVERGED, FAILED, INTERRUPTED = "completed", "diverged", "failed", "interrupted"
FINISHED = (COMPLETED, DIVERGED)
STATUSES = (COMPLETED, DIVERGED, FAILED, INTERRUPTED)

# The study's headline scores (percent): text and image retrieval R@1, zero-shot top-1 and their mean.
HEADLINE = ("txt_r1", "img_r1", "zeroshot_top1", "average")  # on the test sets, scored once at the end
VALIDATION_HEADLINE = tuple(f"val_{name}" for name in HEADLINE)  # every epoch; what selection reads

METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------ provenance
def git_commit() -> str:
    """The commit of the code that runs (``-dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The commit each run of this process recorded in config.json when it started (or resumed), by fingerprint
# digest: its metrics.json records the same one, even if the working tree changes while it trains (a
# notebook autosaved into the checkout turned "abc" into "abc-dirty" half-way).
_STARTED_AT: dict[str, str] = {}


def _started_with(fingerprint: dict) -> str:
    """The commit of the code that runs now, remembered for the run with this fingerprint."""
    commit = _STARTED_AT[fingerprint["digest"]] = git_commit()
    return commit


def package_versions() -> dict:
    import importlib.metadata as md

    names = ["torch", "torchvision", "transformers", "tokenizers", "numpy", "pillow", "pandas", "papermill"]
    versions = {"python": platform.python_version(), "clipstudy": __version__}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions | lock_versions()  # the lock file's digest, and any package that differs from it


def device_description(device) -> dict:
    import torch

    info = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------- metrics.json
def cell_fields(config) -> dict:
    """The fields naming a run's cell, first in every metrics.json."""
    return {
        "cell": config.cell_name(),
        "profile": config.profile,
        "optimizer": config.optimizer_label(),
        "base_optimizer": config.optimizer,
        "loss": config.loss,
        "seed": config.seed,
    }


def run_metrics(
    config,
    *,
    status: str,
    final_scores: dict,
    diverged_at_step,
    global_step: int,
    steps_total: int,
    truncated: bool,
    epochs_completed: int,
    wall_time_s: float,
    train_samples_per_s,
    peak_memory_mb: float,
    skipped_images: int,
    fingerprint: str,
) -> dict:
    """metrics.json of a training run that ended (completed or diverged).

    ``steps_completed`` of ``steps_total`` (the whole run's optimizer steps) ran
    (fewer in a complete run only when batches had no readable image);
    ``truncated`` is True for a completed run that ``max_steps`` cut short (its
    schedule is the whole run's; rerun with a later cut or none, it continues).
    ``epochs_completed`` counts whole epochs only.
    """
    return {
        "status": status,
        **cell_fields(config),
        **{k: v for k, v in final_scores.items() if k not in ("epoch", "step")},
        "diverged_at_step": diverged_at_step,
        "global_step": global_step,
        "steps_completed": global_step,
        "steps_total": steps_total,
        "truncated": status == COMPLETED and truncated,
        "epochs_completed": epochs_completed,
        "wall_time_s": wall_time_s,
        "train_samples_per_s": train_samples_per_s,
        "peak_memory_mb": peak_memory_mb,
        "skipped_images": skipped_images,
        "fingerprint": fingerprint,
        "git_commit": _STARTED_AT.get(fingerprint) or git_commit(),  # what config.json says
    }


def failure_metrics(
    *, cell: str, profile: str, optimizer: str, base_optimizer: str, loss: str, seed: int, error: str
) -> dict:
    """metrics.json of a run that failed (raised, or its notebook did), with the error."""
    return {
        "status": FAILED,
        "cell": cell,
        "profile": profile,
        "optimizer": optimizer,
        "base_optimizer": base_optimizer,
        "loss": loss,
        "seed": seed,
        "error": error,
        "git_commit": git_commit(),
    }


HEADLINE_LABELS = {"txt_r1": "TR@1", "img_r1": "IR@1", "zeroshot_top1": "ACC@1", "average": "Average"}


def run_summary(metrics: dict, run_dir: str | Path) -> str:
    """``Run `reports/runs/smoke/adamw-clip-s0`: completed in 12 s (32 steps). Scores (%): TR@1 1.20, ...``"""
    ended = metrics.get("status", "unknown")
    if ended == DIVERGED:
        ended += f" at step {metrics.get('diverged_at_step')}"
    if metrics.get("wall_time_s") is not None:
        ended += f" in {duration(metrics['wall_time_s'])}"
    steps = f"{metrics['steps_completed']} of {metrics['steps_total']} steps" if "steps_total" in metrics else ""
    scores = ", ".join(
        f"{label} {metrics[key]:.2f}" for key, label in HEADLINE_LABELS.items() if metrics.get(key) is not None
    )
    return (
        f"Run `{shown_path(run_dir)}`: {ended}"
        + (f" ({steps})" if steps else "")
        + (f". Scores (%): {scores}." if scores else ".")
        + (f" Error: {metrics['error']}" if metrics.get("error") else "")
    )


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def shown_path(path: str | Path) -> str:
    """``path`` relative to the project folder when it is inside it (shorter to read), else as given."""
    try:
        return str(Path(path).resolve().relative_to(paths.project_root()))
    except (ValueError, paths.ProjectRootNotFound):
        return str(path)


def write_metrics(run_dir: str | Path, metrics: dict) -> None:
    """Write ``run_dir/metrics.json`` atomically (the only writer)."""
    if metrics.get("status") not in STATUSES:
        raise ValueError(f"metrics status {metrics.get('status')!r} is not one of {STATUSES}")
    write_json(Path(run_dir) / METRICS_FILE, metrics)


def read_metrics(run_dir: str | Path) -> dict | None:
    """``run_dir/metrics.json``, None when absent; an unreadable file reads as a failed run saying why."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        return {"status": FAILED, "error": f"unreadable {METRICS_FILE}: {err}"}


def is_finished(metrics: dict | None) -> bool:
    return bool(metrics) and metrics.get("status") in FINISHED


def is_complete_for(metrics: dict | None, max_steps: int) -> bool:
    """Whether a run needs no more training for a request that stops at ``max_steps`` (0 = the whole run).

    A diverged run and a run of every step are complete; a run cut by
    ``max_steps`` is complete for a request that stops no later than it did.
    """
    if not is_finished(metrics):
        return False
    if metrics["status"] == DIVERGED or not metrics.get("truncated"):
        return True
    total = metrics.get("steps_total", 0)
    wanted = min(max_steps, total) if max_steps else total
    return metrics.get("steps_completed", 0) >= wanted


def progress_note(metrics: dict) -> str:
    """``stopped at step 5 of 125`` for a truncated run, else empty."""
    if not metrics.get("truncated"):
        return ""
    return f"stopped at step {metrics.get('steps_completed')} of {metrics.get('steps_total')}"


# ------------------------------------------------------------------- CSV logs
# The columns every history.csv / epochs.csv has, so a log without rows yet (a run stopped
# before its first evaluation) still has its header; rows may add more (loss extras, scores).
HISTORY_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "data_time", "step_time")
EPOCH_COLUMNS = ("epoch", "step", *VALIDATION_HEADLINE, "eval_time")


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = ()) -> None:
    """Rows as CSV, atomically: ``columns`` first when there are no rows, else the columns in order
    of first appearance; no rows and no columns, an empty file."""
    keys = list(dict.fromkeys(k for row in rows for k in row)) or list(columns)
    if not keys:
        atomic_write_text(path, "")
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class RunLog:
    """A run's ``history.csv`` rows (per logged step) and ``epochs.csv`` rows (per evaluation).

    Rows accumulate in memory (they are also checkpointed, so a resumed run
    continues the same lists) and :meth:`flush` writes both files atomically.
    """

    def __init__(self, run_dir: Path, history: list[dict] | None = None, epochs: list[dict] | None = None, board=None):
        self.run_dir = Path(run_dir)
        self.history = history if history is not None else []
        self.epochs = epochs if epochs is not None else []
        self.board = board  # a TensorBoardLog (or None): the same rows as event files

    def log_step(self, row: dict) -> None:
        """One ``history.csv`` row: step, epoch, loss, lr, grad_norm, timings, loss extras."""
        self.history.append(row)
        if self.board is not None:
            self.board.history_row(row)

    def log_epoch(self, row: dict) -> None:
        """One ``epochs.csv`` row: epoch, step, every evaluation score, eval_time."""
        self.epochs.append(row)
        if self.board is not None:
            self.board.epoch_row(row)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def flush(self) -> None:
        write_csv(self.run_dir / "history.csv", self.history, HISTORY_COLUMNS)
        write_csv(self.run_dir / "epochs.csv", self.epochs, EPOCH_COLUMNS)


# ----------------------------------------------------------------- config.json
def write_run_config(run_dir: Path, config, *, device, world_size: int, command: list[str], fingerprint: dict) -> None:
    """``config.json`` of a new run: the configuration, its fingerprint (:mod:`clipstudy.engine.fingerprint`),
    and where and with what it started."""
    write_json(
        Path(run_dir) / "config.json",
        {
            "config": config.to_dict(),
            "fingerprint": fingerprint,
            "out": str(run_dir),
            "git_commit": _started_with(fingerprint),
            "versions": package_versions(),
            "device": device_description(device),
            "world_size": world_size,
            "command": command,
            "resumes": [],
        },
    )


def read_run_config(run_dir: str | Path) -> dict | None:
    """``run_dir/config.json``, None when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def recorded_fingerprint(run_dir: str | Path) -> dict | None:
    """The fingerprint a run recorded when it started, None if it has none."""
    record = read_run_config(run_dir)
    return record.get("fingerprint") if isinstance(record, dict) else None


def record_resume(
    run_dir: Path, config, *, device, world_size: int, command: list[str], when: str, fingerprint: dict
) -> None:
    """Append a resume (time, commit, device, command) to ``config.json``, keeping the original fields.

    A run whose config.json is missing or unreadable gets a new one.
    """
    path = Path(run_dir) / "config.json"
    record = read_run_config(run_dir)
    if record is None:
        write_run_config(
            run_dir, config, device=device, world_size=world_size, command=command, fingerprint=fingerprint
        )
        record = json.loads(path.read_text())
    record.setdefault("resumes", []).append(
        {
            "time": when,
            "git_commit": _started_with(fingerprint),
            "device": str(device),
            "world_size": world_size,
            "command": command,
        }
    )
    write_json(path, record)
