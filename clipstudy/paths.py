"""Where the project's folders are: decided here, never from the current directory.

* The project root is the source checkout holding this package (the folder
  with ``pyproject.toml`` above ``clipstudy/``), or ``$CLIPSTUDY_ROOT`` when
  set. An installed (non-editable) clipstudy has no checkout: commands then
  need explicit paths (``--out``, ``--runs``, ``--data``) or ``CLIPSTUDY_ROOT``,
  and say so.
* Runs live in ``<root>/reports/runs/<profile>/<cell>``, reports in
  ``<root>/reports/<profile>``, the demo data set in ``<root>/data/demo``.
* The notebooks are the checkout's ``notebooks/``; an installed package carries
  them as package data (``clipstudy/notebooks/``).

Relative paths in a configuration are made absolute once, when the
configuration is made (:func:`absolute`), so ``data/demo`` and
``<root>/data/demo`` are the same configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipstudy.errors import StartupError

PACKAGE_DIR = Path(__file__).resolve().parent
# The protocols of a fair study, each a folder of a profile's runs folder (clipstudy.study.protocols).
PROTOCOLS = ("shared", "tuned")
ROOT_VARIABLE = "CLIPSTUDY_ROOT"
# Local copies of the pretrained weights, used instead of the torch / Hugging Face caches when set.
RESNET50_ENV = "CLIPSTUDY_RESNET50_WEIGHTS"
DISTILBERT_ENV = "CLIPSTUDY_DISTILBERT"


class ProjectRootNotFound(StartupError, RuntimeError):
    """No source checkout and no ``$CLIPSTUDY_ROOT``: a default folder cannot be placed."""


def checkout_root() -> Path | None:
    """The source checkout this package runs from, or None for an installed package."""
    candidate = PACKAGE_DIR.parent
    return candidate if (candidate / "pyproject.toml").is_file() and (candidate / "notebooks").is_dir() else None


def project_root() -> Path:
    """``$CLIPSTUDY_ROOT`` if set, else the source checkout; :class:`ProjectRootNotFound` if neither."""
    env = os.environ.get(ROOT_VARIABLE)
    if env:
        return Path(env).expanduser().resolve()
    root = checkout_root()
    if root is None:
        raise ProjectRootNotFound(
            f"clipstudy is installed outside a source checkout, so it has no default folders: pass the paths "
            f"explicitly (--data, --out, --runs) or set {ROOT_VARIABLE} to the project folder"
        )
    return root


def runs_dir(profile: str) -> Path:
    """The default runs folder of a profile: ``<root>/reports/runs/<profile>``."""
    return project_root() / "reports" / "runs" / profile


def reports_dir(profile: str) -> Path:
    """The default report folder of a profile: ``<root>/reports/<profile>``."""
    return project_root() / "reports" / profile


def demo_data_dir() -> Path:
    """The default demo data folder: ``<root>/data/demo``."""
    return project_root() / "data" / "demo"


def notebook(name: str) -> Path:
    """A shipped notebook (``train.ipynb``, ``analysis.ipynb``): the checkout's, else the package copy."""
    root = checkout_root()
    path = (root / "notebooks" / name) if root else (PACKAGE_DIR / "notebooks" / name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: notebook not found; reinstall clipstudy (it ships the notebooks)")
    return path


def absolute(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """``path`` made absolute against ``base`` (if relative) and normalised; empty stays empty."""
    if not str(path):
        return ""
    return os.path.normpath(os.path.join(base, os.path.expanduser(str(path))))
