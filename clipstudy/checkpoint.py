"""Atomic, verified checkpoints and result files.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, then renamed over its final name, so a crash mid-write never leaves a
half-written ``ckpt-*.pt``. Each checkpoint has a ``.sha256`` sidecar written
after it; loading verifies the digest and reads with
``torch.load(weights_only=True)`` (no arbitrary unpickling). A checkpoint that
fails either check is reported and the previous one is used.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from clipstudy.errors import RunFailure, StartupError, WriteFailure, human_size

log = logging.getLogger("clipstudy.checkpoint")
CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(StartupError, RuntimeError):
    """No usable checkpoint where one is needed (evaluate), or one of another format."""


class CellBusy(RunFailure, RuntimeError):
    """Another live process holds this run directory's lock."""


LOCK_NAME = ".lock"


SWEEP_LOCK_NAME = ".sweep.lock"


@contextlib.contextmanager
def cell_lock(folder: str | Path, name: str = LOCK_NAME, *, wait: bool = False):
    """Hold an exclusive lock on ``folder/<name>`` for the duration of a run.

    With ``wait`` it blocks until the lock is free instead of raising CellBusy.

    An ``flock`` belongs to the open file, so the kernel releases it when the
    holder dies, even by ``kill -9``: a killed run never leaves a stuck lock.
    Training holds ``.lock``; a sweep holds ``.sweep.lock`` around the whole
    notebook execution of a cell (the kernel that trains is another process).
    """
    path = Path(folder) / name
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise CellBusy(f"{folder} is being trained by another process (lock {path}); "
                           "wait for it or use another output directory") from None
        pid = f"{os.getpid()}\n".encode()
        try:  # unbuffered, so a full disk fails here and not again when the file is closed
            os.ftruncate(fh.fileno(), 0)
            os.pwrite(fh.fileno(), pid, 0)
        except OSError as err:
            raise WriteFailure(f"cannot write {path} ({human_size(len(pid))}): {err.strerror or err}. Free disk "
                               f"space or make {folder} writable, then rerun the same command",
                               path=path, size=len(pid), errno=err.errno) from err
        yield path
    finally:
        fh.close()


def is_locked(folder: str | Path, name: str = LOCK_NAME) -> bool:
    """Whether a live process holds ``folder/<name>`` (checked without waiting)."""
    path = Path(folder) / name
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` sets it too, which races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename.

    The file gets the permissions a plain ``open()`` would give it (0666 less
    the umask), not the owner-only mode of a temporary file, so results stay
    readable by whoever may read the folder. A failed write (full disk, no
    permission) raises :class:`~clipstudy.errors.WriteFailure` naming the file
    and its size; the file keeps its previous content.
    """
    path = Path(path)
    try:
        _replace_atomically(path, data)
    except OSError as err:
        raise WriteFailure(
            f"cannot write {path} ({human_size(len(data))}): {err.strerror or err}. Free disk space or make "
            f"{path.parent} writable, then rerun the same command; the file keeps its previous content",
            path=path, size=len(data), errno=err.errno) from err


def _replace_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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
        _replace_atomically(path, data)
        _replace_atomically(sidecar, (hashlib.sha256(data).hexdigest() + "\n").encode())
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
            "newest checkpoint still there", path=path, size=len(data), errno=err.errno) from err
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
