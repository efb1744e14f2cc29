"""Checks that a configuration can start, made before anything is trained or written.

:func:`check_components` (the loss and the optimizer accept their parameters,
each judged by the component itself) runs for every cell when ``sweep`` plans
it; :func:`check_inputs` (that, the data and the weights) is called by
``train`` (before the data sets are built), ``evaluate`` and, once for every
distinct setting, by ``sweep`` before any notebook kernel starts. Each failure is a
:class:`~clipstudy.errors.StartupError` naming the field, the path and the fix.
"""

from __future__ import annotations

from pathlib import Path

from clipstudy.data.layout import LAYOUT, REQUIRED
from clipstudy.engine.config import RunConfig
from clipstudy.engine.splits import FIELDS as SPLIT_FIELDS
from clipstudy.engine.splits import TEST


def demo_data_hint(folder: str | Path) -> str:
    return (
        f"make the demo set with `make demo-data` (the default folder) or "
        f"`python -m clipstudy make-demo-data --out {folder}`"
    )


def require_data(config: RunConfig) -> None:
    """Every data path of ``config`` exists; a missing demo-layout folder says how to make it."""
    from clipstudy.data.datasets import DataError
    from clipstudy.engine.config import ConfigError

    paths = config.resolved_paths()
    if not paths["train_ann"] or not paths["train_images"]:
        raise ConfigError(
            "config fields 'train_ann'/'train_images' are empty: set `data` (demo layout) "
            "or both paths (formats in docs/protocol.md)"
        )
    if config.data and not (config.train_ann and config.train_images):  # the training set comes from `data`
        missing = [LAYOUT[key] for key in REQUIRED if not (Path(config.data) / LAYOUT[key]).exists()]
        if missing:
            raise DataError(
                f"config field 'data'={config.data!r}: no data set there ({', '.join(missing)} "
                f"missing); {demo_data_hint(config.data)}, or pass --data DIR"
            )
    given = config.to_dict()
    unread = set() if config.evaluate_test else set(SPLIT_FIELDS[TEST])  # a tuning trial never opens them
    for name, path in paths.items():
        if not path or name in unread or Path(path).exists():
            continue
        field = name if given.get(name) else "data"
        raise DataError(
            f"config field {field!r}: {path} not found; pass an existing "
            f"{'file' if name.endswith('_ann') else 'folder'} (formats in docs/protocol.md)"
        )


def check_components(config: RunConfig) -> None:
    """The loss and the optimizer are registered and accept their parameters (checked by each
    component itself); ConfigError naming the field otherwise. Reads no data."""
    from clipstudy.core.losses import LOSSES, available_losses, check_loss_params
    from clipstudy.core.optim import OPTIMIZERS, available_optimizers, check_optimizer_options
    from clipstudy.engine.config import ConfigError

    def fail(name, msg):
        raise ConfigError(f"config field {name!r}={getattr(config, name)!r}: {msg}")

    if config.optimizer not in OPTIMIZERS:
        fail("optimizer", f"choose one of {available_optimizers()}")
    if config.loss not in LOSSES:
        fail("loss", f"choose one of {available_losses()}")
    for name, check in (
        (
            "loss_params",
            lambda: check_loss_params(config.loss, temperature=config.temperature, params=config.loss_params),
        ),
        (
            "optimizer_params",
            lambda: check_optimizer_options(config.optimizer, **config.optimizer_settings()),
        ),
    ):
        try:
            check()
        except (TypeError, ValueError) as err:
            fail(name, str(err))


def check_inputs(config: RunConfig) -> None:
    """The data exists and the pretrained weights the configuration loads are in the local caches."""
    from clipstudy.core.models import require_weights

    check_components(config)
    require_data(config)
    require_weights(config)
