"""The errors a user sees, and the exit status of each kind.

Every command runs under the dispatcher of ``python -m clipstudy``
(:mod:`clipstudy.__main__`), which turns these into one line on stderr and
an exit status, so no command formats its own failures:

* :class:`StartupError` (exit 2): the command cannot start as given (a bad
  field, a missing file or folder, weights not cached). The message names the
  field or file and the fix. Raised before anything is written.
* :class:`WriteFailure` (exit 1): a file could not be written (full disk, no
  permission). The message names the file and its size; what was on disk
  before stays as it was.
* :class:`RunFailure` (exit 1): a run could not go on (its folder is busy,
  no image of an epoch could be read).

Subclasses keep their own names (``ConfigError``, ``DataError``...) so a
caller can catch one concern. Anything else is a bug and keeps its traceback.
With ``--debug`` (or ``CLIPSTUDY_DEBUG=1``) every error shows its traceback.
"""

from __future__ import annotations

DEBUG_VARIABLE = "CLIPSTUDY_DEBUG"


class ClipstudyError(Exception):
    """A failure the user can act on; ``exit_code`` is the command's exit status."""

    exit_code = 1


class StartupError(ClipstudyError):
    """The command cannot start as given; nothing was written."""

    exit_code = 2


class RunFailure(ClipstudyError):
    """A run stopped for a reason outside the code (busy folder, unreadable data)."""

    exit_code = 1


class WriteFailure(ClipstudyError, OSError):
    """A file could not be written; ``path`` and ``size`` (bytes) say which and how large, ``errno`` why
    (the underlying OSError's, e.g. ENOSPC)."""

    exit_code = 1

    def __init__(self, message: str, *, path=None, size: int | None = None, errno: int | None = None):
        super().__init__(message)
        self.path, self.size, self.errno = path, size, errno

    def __str__(self) -> str:  # OSError's own __str__ would show the arguments tuple
        return self.args[0] if self.args else ""


def human_size(size: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"unknown size"``."""
    if size is None:
        return "unknown size"
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line fix texts are joined)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return text or type(err).__name__
