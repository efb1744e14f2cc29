"""Checks that a configuration can start, made before anything is trained or written.

:func:`check_inputs` is called by ``train`` (before the data sets are
built), ``evaluate`` and, once for every distinct setting, by ``sweep``
before any notebook kernel starts. Each failure is a
:class:`~clipstudy.errors.StartupError` naming the field, the path and the fix.
"""
from __future__ import annotations

from pathlib import Path

from clipstudy.engine.config import RunConfig

# What a data folder in the demo layout must hold (see docs/protocol.md for the formats).
DEMO_LAYOUT = ("train.json", "images")


def demo_data_hint(folder: str | Path) -> str:
    return (f"make the demo set with `make demo-data` (the default folder) or "
            f"`python -m clipstudy make-demo-data --out {folder}`")


def require_data(config: RunConfig) -> None:
    """Every data path of ``config`` exists; a missing demo-layout folder says how to make it."""
    from clipstudy.engine.config import ConfigError
    from clipstudy.data.datasets import DataError

    paths = config.resolved_paths()
    if not paths["train_ann"] or not paths["train_images"]:
        raise ConfigError("config fields 'train_ann'/'train_images' are empty: set `data` (demo layout) "
                          "or both paths (formats in docs/protocol.md)")
    if config.data and not (config.train_ann and config.train_images):  # the training set comes from `data`
        missing = [name for name in DEMO_LAYOUT if not (Path(config.data) / name).exists()]
        if missing:
            raise DataError(f"config field 'data'={config.data!r}: no data set there ({', '.join(missing)} "
                            f"missing); {demo_data_hint(config.data)}, or pass --data DIR")
    given = config.to_dict()
    for name, path in paths.items():
        if not path or Path(path).exists():
            continue
        field = name if given.get(name) else "data"
        raise DataError(f"config field {field!r}: {path} not found; pass an existing "
                        f"{'file' if name.endswith('_ann') else 'folder'} (formats in docs/protocol.md)")


def check_inputs(config: RunConfig) -> None:
    """The data exists and the pretrained weights the configuration loads are in the local caches."""
    from clipstudy.core.models import require_weights

    require_data(config)
    require_weights(config)
