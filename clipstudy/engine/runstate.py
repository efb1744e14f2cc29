"""A run's state: capture, restore, random generators, stop requests, and the one :func:`resume` entry point.

A checkpoint holds everything a run needs to continue as if never stopped:
model, loss state, optimizer, schedule, gradient scaler, the CPU/CUDA/NumPy/
Python generators, the position (epoch, batch, step), the logged rows and the
configuration it was trained with. :func:`resume` loads the newest valid
checkpoint of a run directory, refuses one of another format or written with
another configuration (before anything is written), and restores it.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipstudy.core.distributed import unwrap_model
from clipstudy.engine import records
from clipstudy.engine.checkpoint import CKPT_RE, CheckpointError, checkpoint_paths, load_latest, verified_bytes
from clipstudy.engine.config import ConfigError, RunConfig
from clipstudy.engine.fingerprint import RESULT_NEUTRAL_FIELDS, describe_change

log = logging.getLogger("clipstudy.engine.train")

# Version of the checkpoint layout written by capture_state; bump it when the layout changes.
CHECKPOINT_FORMAT = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj):
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def capture_state(run, epoch: int, batch_in_epoch: int, global_step: int, history, epochs, elapsed) -> dict:
    model = unwrap_model(run.model)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "loss": run.loss.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "global_step": global_step,
        "history": history,
        "epochs": epochs,
        "elapsed": elapsed,
        "config": json.dumps(run.config.to_dict()),
    }


def restore_state(run, state: dict) -> None:
    model = unwrap_model(run.model)
    model.load_state_dict(state["model"])
    run.loss.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def check_resume_compatible(config: RunConfig, saved_json: str, path: Path) -> None:
    saved = json.loads(saved_json)
    changed = {
        k: (saved.get(k), v)
        for k, v in config.to_dict().items()
        # max_steps is result-neutral: a cut run continues, with the same schedule, when rerun with a later stop
        if k not in RESULT_NEUTRAL_FIELDS and saved.get(k) != v
    }
    if changed:
        raise ConfigError(
            f"{path} was written with a different configuration ({changed}); "
            "resume with the same settings or use a new output directory"
        )


def check_checkpoint_format(state: dict, path: Path) -> None:
    found = state.get("format")
    if found != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{path}: checkpoint format {found!r}, this clipstudy reads format {CHECKPOINT_FORMAT}; "
            "resume it with the clipstudy version that wrote it, or use a new output directory"
        )


def check_recorded_fingerprint(out: Path, fingerprint: dict) -> None:
    """Refuse (:class:`ConfigError`, nothing written) to continue a run that recorded another fingerprint.

    This also catches what the checkpoint's configuration cannot show: other
    data under the same paths. A run recorded before fingerprints existed is
    left to the checkpoint's configuration check.
    """
    recorded = records.recorded_fingerprint(out)
    change = describe_change(recorded, fingerprint) if recorded else None
    if change:
        raise ConfigError(
            f"{out} was written with a different configuration ({change}); resume with the same "
            "settings, or use a new output directory (--out, or a --label for a variant)"
        )


def already_complete(out: Path, config: RunConfig, fingerprint: dict, *, announce: bool = True) -> dict | None:
    """metrics.json of a run in ``out`` that needs no more training for ``config``, else None.

    Complete: finished (completed or diverged), recorded at the newest
    checkpoint, which is intact, and not cut earlier than ``config.max_steps``
    asks (:func:`clipstudy.engine.records.is_complete_for`). A run in ``out``
    recorded with another fingerprint is refused first
    (:func:`check_recorded_fingerprint`).
    """
    found = checkpoint_paths(Path(out) / "checkpoints")
    if not found:  # nothing to continue
        return None
    check_recorded_fingerprint(out, fingerprint)
    done = records.read_metrics(out)
    if not (
        records.is_complete_for(done, config.max_steps)
        and done.get("global_step") == int(CKPT_RE.match(found[0].name).group(1))
    ):
        return None
    try:
        verified_bytes(found[0])
    except CheckpointError:  # resume() falls back to an older checkpoint, saying so, and trains on
        return None
    if announce:
        note = records.progress_note(done)
        print(
            f"{out}: already complete ({done['status']}{', ' + note if note else ''}); nothing to do", file=sys.stderr
        )
    return done


@dataclass
class ResumePoint:
    """Where a resumed run continues (see :func:`resume`)."""

    path: Path
    epoch: int
    batch_in_epoch: int
    global_step: int
    elapsed: float
    history: list = field(default_factory=list)
    epochs: list = field(default_factory=list)


def resume(run, out: Path, *, announce: bool = True) -> ResumePoint | None:
    """Restore ``run`` from the newest valid checkpoint in ``out/checkpoints``; None if there is none.

    Raises :class:`ConfigError` (and changes nothing) when the checkpoint has
    another format or was written with a different configuration.
    """
    state, path, warnings = load_latest(out / "checkpoints")
    for msg in warnings:
        print("WARNING:", msg, file=sys.stderr)
    if state is None:
        return None
    check_checkpoint_format(state, path)
    check_resume_compatible(run.config, state["config"], path)
    restore_state(run, state)
    point = ResumePoint(
        path,
        state["epoch"],
        state["batch_in_epoch"],
        state["global_step"],
        state["elapsed"],
        state["history"],
        state["epochs"],
    )
    if announce:
        print(
            f"resumed from {path} (epoch {point.epoch + 1}, batch {point.batch_in_epoch}, step {point.global_step})",
            file=sys.stderr,
        )
    return point


class StopRequest:
    """Turns SIGTERM / SIGINT / SIGUSR2 into a flag checked between steps (then a checkpoint is written)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):  # USR2: Slurm before a time limit
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %s: checkpointing after this step", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
