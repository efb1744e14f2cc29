"""The pinned software environment: the lock file, its digest, and how the running Python compares.

``make lock`` writes ``requirements/lock.txt`` with pip-tools (every package of the runtime and
``dev`` dependencies, exact version, sha256 hashes) and ``make setup`` installs exactly it. Each run
records ``lock_versions()`` in its config.json beside the package versions, so the report can tell
runs made in different environments apart (``clipstudy.study.report.environment_table``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from clipstudy.paths import PACKAGE_DIR

REPO_ROOT = PACKAGE_DIR.parent  # the checkout (an installed package has no lock file: reported as absent)
LOCK_FILE = REPO_ROOT / "requirements" / "lock.txt"
PYPROJECT = REPO_ROOT / "pyproject.toml"
LOCK_PYTHON = "3.11"  # the interpreter `make lock` resolves for; `make setup` refuses another
# pip-compile's annotation for a package that pyproject.toml asks for by name
DIRECT_SOURCE = re.compile(r"^clipstudy \(pyproject\.toml(::build-system\.requires)?\)$")


class LockError(ValueError):
    """The lock file is missing, unreadable or out of step with pyproject.toml."""


@dataclass(frozen=True)
class LockedPackage:
    name: str  # canonical (PEP 503) name
    version: str
    hashes: tuple[str, ...]
    via: tuple[str, ...]  # pip-compile's "# via" annotations: who asked for it

    @property
    def direct(self) -> bool:
        """Asked for by pyproject.toml itself (not only pulled in by another package)."""
        return any(DIRECT_SOURCE.match(v) for v in self.via)


# ------------------------------------------------------------------ reading
def read_lock(path: Path = LOCK_FILE) -> dict[str, LockedPackage]:
    """Parse a pip-compile ``--generate-hashes`` output into {canonical name: LockedPackage}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise LockError(f"{path}: cannot read the lock file ({err.strerror}); run `make lock`") from err
    blocks: list[list[str]] = []
    for raw in text.splitlines():
        if raw and not raw[0].isspace() and not raw.startswith(("#", "-")):
            blocks.append([raw])  # a new "name==version \" line
        elif blocks and raw.strip():
            blocks[-1].append(raw.strip())  # its hashes and "# via" lines
    return dict(_parse_block(path, b) for b in blocks)


def _parse_block(path: Path, lines: list[str]) -> tuple[str, LockedPackage]:
    head = lines[0].rstrip(" \\")
    name, sep, version = head.partition("==")
    if not sep or not version or ";" in version:
        raise LockError(f"{path}: '{head}' is not an exact pin (name==version); run `make lock`")
    hashes = tuple(line.rstrip(" \\").removeprefix("--hash=") for line in lines[1:] if line.startswith("--hash="))
    notes = (re.sub(r"^via(\s|$)", "", line.lstrip("#").strip()) for line in lines[1:] if line.startswith("#"))
    via = [note.strip() for note in notes if note.strip()]
    return canonicalize_name(name), LockedPackage(canonicalize_name(name), version.strip(), hashes, tuple(via))


def pyproject_requirements(path: Path = PYPROJECT, extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    """The requirements the lock must cover: runtime dependencies, the given extras, build requirements."""
    meta = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    project = meta.get("project", {})
    specs = list(project.get("dependencies", []))
    for extra in extras:
        specs += project.get("optional-dependencies", {}).get(extra, [])
    specs += meta.get("build-system", {}).get("requires", [])
    return [Requirement(s) for s in specs]


def lock_digest(path: Path = LOCK_FILE) -> str | None:
    """sha256 of the lock file's bytes, or None where clipstudy runs without one (a plain pip install)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# ------------------------------------------------------------------ checks
def lock_problems(lock: dict[str, LockedPackage], requirements: list[Requirement]) -> list[str]:
    """Where the lock and pyproject.toml disagree, one sentence each (empty: the lock satisfies it)."""
    problems = []
    wanted = {canonicalize_name(r.name): r for r in requirements}
    for name, req in wanted.items():
        pin = lock.get(name)
        if pin is None:
            problems.append(f"{req} is in pyproject.toml but not in the lock")
        elif not pin.direct:
            problems.append(f"{req} is in pyproject.toml but the lock has {name} only as another package's dependency")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"pyproject.toml asks for {req}, the lock pins {name}=={pin.version}")
    for name, pin in lock.items():
        if pin.direct and name not in wanted:
            problems.append(f"the lock pins {name}=={pin.version} for pyproject.toml, which no longer asks for it")
        if not pin.hashes:
            problems.append(f"the lock pins {name}=={pin.version} without a hash")
    return problems


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of the distributions the running Python sees (what `pip freeze` lists)."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def lock_mismatches(lock: dict[str, LockedPackage], installed: dict[str, str]) -> list[str]:
    """Locked packages missing from, or at another version in, ``installed`` (empty: in step)."""
    out = []
    for name, pin in sorted(lock.items()):
        have = installed.get(name)
        if have != pin.version:
            out.append(f"{name}: locked {pin.version}, installed {have or 'nothing'}")
    return out


# ------------------------------------------------------------------ provenance
def lock_versions(path: Path = LOCK_FILE) -> dict:
    """What config.json records beside the package versions: which lock, and whether this Python matches it."""
    digest = lock_digest(path)
    record = {"lock_file": None, "lock_sha256": digest, "lock_mismatches": None}
    if digest is not None:
        record["lock_file"] = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
        try:
            record["lock_mismatches"] = lock_mismatches(read_lock(path), installed_versions())
        except LockError as err:
            record["lock_mismatches"] = [str(err)]
    return record
