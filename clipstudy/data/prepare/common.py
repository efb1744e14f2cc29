"""What every converter shares: the error, the result record, writes that redo only what changed, links."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipstudy.errors import StartupError
from clipstudy.fileio import atomic_write_text


class PrepareError(StartupError):
    """An input cannot be used as given; the message names the file and the fix."""


@dataclass
class Prepared:
    """What a subcommand produced: the config fields to pass on and what it counted."""

    fields: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # reason -> how many
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few names

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(name)


# --------------------------------------------------------------------------- output helpers


def progress_bar(iterable: Iterable | None = None, **kwargs):
    """tqdm on stderr (stdout is kept for the result)."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not kwargs.pop("progress", True), **kwargs)


def write_text_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it; True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def write_json_if_changed(path: Path, value: Any) -> bool:
    return write_text_if_changed(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def ensure_link(link: Path, target: Path) -> bool:
    """Make ``link`` a symbolic link to ``target`` (absolute); True if it had to be (re)made."""
    target = target.absolute()
    if link.is_symlink() and os.readlink(link) == str(target):
        return False
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise PrepareError(f"{link}: exists and is not a link this command made; remove it or choose another --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return True


def require_path(path: Path, what: str, fix: str, folder: bool = False) -> Path:
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        raise PrepareError(f"{path}: {what} not found; {fix}")
    return path


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrepareError(f"{path}: not valid JSON ({error}); pass the {what}") from None


# --------------------------------------------------------------------------- coco-karpathy
