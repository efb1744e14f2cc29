"""A run's configuration fingerprint: what determines its result, so a stale run is never called done.

The fingerprint (:func:`fingerprint`) has two parts:

* ``config``: every configuration field that can change the numbers a run
  produces, with the data paths resolved (the ``data`` shorthand expanded) and
  absolute, so two spellings of one folder agree. Left out are the fields that
  only say where or how fast a run executes (:data:`RESULT_NEUTRAL_FIELDS`) and
  ``max_steps``: a cut run is the full run stopped early, and extending it
  continues from its checkpoint.
* ``data``: SHA-256 digests of the annotation files, of the zero-shot folder's
  listing and class names, of the tokenizer folder, and the demo generator's
  manifest (version, parameters, content digest) when the data folder has one.

``digest`` is the SHA-256 of both parts as canonical JSON. ``config.json``
records the whole fingerprint and ``metrics.json`` its digest; the code's git
commit is recorded beside it but is not part of it (a code change alone does
not make a result stale). :func:`differences` names what changed between two
fingerprints, e.g. ``lr 0.002 -> 0.05``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from clipstudy.engine.config import PATH_FIELDS  # replaced in the fingerprint by the resolved paths
from clipstudy.engine.splits import FIELDS as SPLIT_FIELDS
from clipstudy.engine.splits import PREFIX as SPLIT_PREFIX
from clipstudy.engine.splits import TEST, VALIDATION

# Fields that do not change a run's numbers: where it runs and how fast, how often it logs, how many
# checkpoints it keeps, TensorBoard logs, and where it stops (max_steps: the schedule is the full run's).
RESULT_NEUTRAL_FIELDS = frozenset(
    {
        "out",
        "num_workers",
        "threads",
        "device",
        "log_every",
        "cache_images",
        "keep_checkpoints",
        "max_steps",
        "tensorboard",
    }
)
MISSING = "missing"

# (path, size, mtime_ns) -> digest: a sweep fingerprints every cell over the same files.
_file_digests: dict[tuple, str] = {}
# (root, contents) -> digest, only inside listings_cached(): a folder's listing has no cheap change stamp
# (a file added in a class folder leaves the root's mtime alone), so it is cached for one pass only.
_listings: dict[tuple, str] | None = None


@contextlib.contextmanager
def listings_cached():
    """Within the block each folder is listed once: a sweep's pass over its cells (plan, dry run, status)
    fingerprints every cell over the same zero-shot folder, which can hold 50 000 images."""
    global _listings
    outer = _listings
    _listings = {} if outer is None else outer
    try:
        yield
    finally:
        _listings = outer


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (cached while the file's size and time are unchanged); ``missing`` if absent."""
    try:
        stat = os.stat(path)
    except OSError:
        return MISSING
    key = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def folder_digest(root: str | os.PathLike, *, contents: bool = False) -> str:
    """SHA-256 of the relative paths under ``root`` (and, with ``contents``, of each file's bytes).

    A folder of images is fingerprinted by its listing (reading 50 000 images
    would take minutes); a small folder such as a tokenizer by its contents.
    """
    root = Path(root)
    key = (os.fspath(root), contents)
    if _listings is not None and key in _listings:
        return _listings[key]
    if not root.is_dir():
        return MISSING
    digest = hashlib.sha256()
    files = sorted(Path(folder, name) for folder, _, names in os.walk(root) for name in names)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if contents:
            digest.update(file_digest(path).encode())
    if _listings is not None:
        _listings[key] = digest.hexdigest()
    return digest.hexdigest()


def demo_manifest(data: str) -> dict | None:
    """The demo generator's identity of the set in ``data`` (version, parameters, content digest), if any."""
    try:
        manifest = json.loads((Path(data) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {key: manifest.get(key) for key in ("generator_version", "parameters", "digest")}


def data_fingerprint(config) -> dict:
    """Digests of what the run reads besides the images themselves (see the module docstring)."""
    paths = config.resolved_paths()
    data: dict = {}
    if config.data:  # first: the generator's parameters say best what changed
        manifest = demo_manifest(config.data)
        if manifest is not None:
            data["demo_manifest"] = manifest
    data["train_ann"] = file_digest(paths["train_ann"]) if paths["train_ann"] else ""
    # the test sets only when the run scores them: a tuning trial never opens their files
    for split in (TEST, VALIDATION) if config.evaluate_test else (VALIDATION,):
        ann, _, zeroshot = SPLIT_FIELDS[split]
        prefix = SPLIT_PREFIX[split]
        data[f"{prefix}retrieval_ann"] = file_digest(paths[ann]) if paths[ann] else ""
        if paths[zeroshot]:
            data[f"{prefix}zeroshot_listing"] = folder_digest(paths[zeroshot])
            data[f"{prefix}zeroshot_classnames"] = file_digest(Path(paths[zeroshot]) / "classnames.json")
    if paths["tokenizer"]:
        data["tokenizer"] = folder_digest(paths["tokenizer"], contents=True)
    return data


def fingerprint(config) -> dict:
    """``{"digest", "config", "data"}`` of a :class:`~clipstudy.engine.config.RunConfig` (see the module docstring)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in RESULT_NEUTRAL_FIELDS and k not in PATH_FIELDS}
    fields.update(config.resolved_paths())
    body = {"config": fields, "data": data_fingerprint(config)}
    return {"digest": digest_of(body), **body}


def digest_of(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(key: str, value) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and key.startswith("data") and len(value) == 64:
        return value[:8]  # a digest: its first characters tell two apart
    return json.dumps(value) if isinstance(value, str) and not value else str(value)


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, one ``field old -> new`` each (config fields by bare name)."""
    flat_old = _flatten({k: old.get(k, {}) for k in ("config", "data")})
    flat_new = _flatten({k: new.get(k, {}) for k in ("config", "data")})
    changes = []
    for key in dict.fromkeys([*flat_old, *flat_new]):
        a, b = flat_old.get(key), flat_new.get(key)
        if a != b:
            name = key.removeprefix("config.")
            changes.append(f"{name} {_show(key, a)} -> {_show(key, b)}")
    return changes


def describe_change(old: dict | None, new: dict) -> str | None:
    """None when ``old`` (a recorded fingerprint) matches ``new``, else what changed in a few words."""
    if not old or "digest" not in old:
        return "no fingerprint recorded (run made by an older clipstudy)"
    if old["digest"] == new["digest"]:
        return None
    changes = differences(old, new)
    shown = ", ".join(changes[:4]) + (f", and {len(changes) - 4} more" if len(changes) > 4 else "")
    return shown or "fingerprint differs"
