"""Files that are never half-written, and locks that die with their holder.

Every record of the study (metrics, configs, checkpoints, prepared data sets,
job records) is written through :func:`atomic_write_bytes`: a temporary file in
the same folder, flushed, then renamed over the final name. Run folders are
guarded by :func:`cell_lock` (an ``flock``, released by the kernel when the
holder dies, even by ``kill -9``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clipstudy.errors import RunFailure, WriteFailure, human_size


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
            raise CellBusy(
                f"{folder} is being trained by another process (lock {path}); "
                "wait for it or use another output directory"
            ) from None
        pid = f"{os.getpid()}\n".encode()
        try:  # unbuffered, so a full disk fails here and not again when the file is closed
            os.ftruncate(fh.fileno(), 0)
            os.pwrite(fh.fileno(), pid, 0)
        except OSError as err:
            raise WriteFailure(
                f"cannot write {path} ({human_size(len(pid))}): {err.strerror or err}. Free disk "
                f"space or make {folder} writable, then rerun the same command",
                path=path,
                size=len(pid),
                errno=err.errno,
            ) from err
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
        replace_atomically(path, data)
    except OSError as err:
        raise WriteFailure(
            f"cannot write {path} ({human_size(len(data))}): {err.strerror or err}. Free disk space or make "
            f"{path.parent} writable, then rerun the same command; the file keeps its previous content",
            path=path,
            size=len(data),
            errno=err.errno,
        ) from err


def replace_atomically(path: Path, data: bytes) -> None:
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
