"""Atomic, verified checkpoints and result files.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over its final name, so a crash mid-write never leaves a
half-written ``ckpt-*.pt``. Each checkpoint has a ``.sha256`` sidecar written
after it; loading verifies the digest and reads with
``torch.load(weights_only=True)`` (no arbitrary unpickling). A checkpoint that
fails either check is reported and the previous one is used.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from clipstudy.errors import StartupError, WriteFailure, human_size
from clipstudy.fileio import replace_atomically

log = logging.getLogger("clipstudy.engine.checkpoint")
CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(StartupError, RuntimeError):
    """No usable checkpoint where one is needed (evaluate), or one of another format."""


def checkpoint_paths(folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)), reverse=True)


class CheckpointWriteError(WriteFailure):
    """A checkpoint could not be written (full disk, no permission); older ones are intact."""


def save_checkpoint(folder: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save ``state`` as ``folder/ckpt-<step>.pt`` atomically; keep the newest ``keep``.

    Older checkpoints are removed only after the new one and its digest are on
    disk, so a failed write (CheckpointWriteError) leaves them as they were.
    """
    import io

    import torch  # here, not at the top: the sweep's job processes need this module's locks, not torch

    folder = Path(folder)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = folder / f"ckpt-{step:08d}.pt"
    sidecar = path.with_name(path.name + ".sha256")
    try:  # the raw writes: their OSError is reported once, below, as a checkpoint error
        replace_atomically(path, data)
        replace_atomically(sidecar, (hashlib.sha256(data).hexdigest() + "\n").encode())
    except OSError as err:
        for p in (sidecar, path):  # never leave a checkpoint without its digest
            try:
                p.unlink()
            except OSError:
                pass
        reason = err.strerror or err
        raise CheckpointWriteError(
            f"cannot write checkpoint {path} ({human_size(len(data))}): {reason}. "
            f"Free disk space or make {folder} writable, then rerun the same command: it resumes from the "
            "newest checkpoint still there",
            path=path,
            size=len(data),
            errno=err.errno,
        ) from err
    for old in checkpoint_paths(folder)[keep:]:
        for p in (old, old.with_name(old.name + ".sha256")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``folder``.

    A process killed mid-write (``kill -9``, OOM) leaves ``.<name>.<random>.tmp``
    behind; nothing reads them, but a checkpoint-sized one wastes disk on every
    crash. Call only while holding the folder's cell lock, so no live writer owns them.
    """
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def load_verified(path: str | Path) -> dict:
    """Load one checkpoint after checking its digest; CheckpointError if it is damaged."""
    path = Path(path)
    data = verified_bytes(path)
    import io

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged archive raises several types
        raise CheckpointError(f"{path}: not a loadable checkpoint ({err})") from err


def verified_bytes(path: str | Path) -> bytes:
    """A checkpoint's bytes, checked against its ``.sha256`` sidecar; CheckpointError if they differ."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from err
    if not sidecar.is_file():
        raise CheckpointError(f"{path}: no {sidecar.name} beside it (the write did not finish)")
    expected = sidecar.read_text().strip()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{path}: content does not match its sha256 (truncated or corrupted)")
    return data


def load_latest(folder: str | Path) -> tuple[dict | None, Path | None, list[str]]:
    """The newest checkpoint that verifies, with warnings for the ones skipped."""
    warnings = []
    for path in checkpoint_paths(folder):
        try:
            return load_verified(path), path, warnings
        except CheckpointError as err:
            msg = f"skipping damaged checkpoint: {err}; falling back to the previous one"
            log.warning(msg)
            warnings.append(msg)
    return None, None, warnings
