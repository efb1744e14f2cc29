"""The tuning table (``reports/<profile>/tuning.csv``): every trial of ``tune``, with its choices marked.

``tune`` writes it; ``sweep --lr-from`` and ``study`` read the rates it chose
(:func:`rates_from`). One row per trial: ``group`` (an optimizer, or
``optimizer:loss``), ``optimizer``, ``loss``, ``lr``, ``weight_decay``, ``seed``,
``status``, ``val_average``, ``run_dir``, and the booleans ``tuned`` (the group's
chosen setting) and ``shared`` (the one rate every optimizer shares).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from clipstudy.engine.config import ConfigError
from clipstudy.fileio import atomic_write_text


def write_table(trials: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, trials.to_csv(index=False, float_format="%.6g"))


def rates_from(path: str | Path, protocol: str) -> dict[str, float]:
    """The rates a tuning table chose: ``{optimizer or "optimizer:loss": lr}`` for ``tuned``, or ``{"*": lr}``
    for ``shared``. A clear error when the file is missing or is not a tuning table."""
    try:
        table = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ConfigError(
            f"--lr-from {path}: cannot read a tuning table ({err}); run `python -m clipstudy tune`"
        ) from None
    missing = {"group", "lr", "tuned", "shared"} - set(table.columns)
    if missing:
        raise ConfigError(f"--lr-from {path}: not a tuning table (no column {sorted(missing)}); see `clipstudy tune`")
    if protocol == "shared":
        rates = sorted(set(table.loc[table["shared"], "lr"]))
        if len(rates) != 1:
            raise ConfigError(f"--lr-from {path}: no shared rate (every optimizer must have tried it)")
        return {"*": float(rates[0])}
    chosen = table.loc[table["tuned"]].groupby("group")["lr"].first()
    return {group: float(lr) for group, lr in chosen.items()}
