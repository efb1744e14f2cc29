"""Named optimizer variants beyond the original grid: one registered optimizer with some fields set.

A variant runs as its own row of the study (``sweep --optimizers adam-nol2``);
its display name is written here once. More come from ``sweep --variant``
(they show their label). Which optimizer a variant modifies is read from its
runs (metrics.json's ``base_optimizer``), never from its name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clipstudy.core.optim import OPTIMIZERS, default_grid_optimizers, optimizers_in_order


@dataclass(frozen=True)
class Variant:
    display_name: str
    fields: dict = field(default_factory=dict)  # configuration fields, "optimizer" among them


VARIANTS: dict[str, Variant] = {
    "adam-nol2": Variant("Adam (no L2)", {"optimizer": "adam", "weight_decay": 0.0}),  # Adam without its L2 penalty
    # the initialisation ablation: the same cells from random towers instead of pretrained ones
    **{
        f"{name}-scratch": Variant(
            f"{OPTIMIZERS[name].display_name} (scratch)", {"optimizer": name, "pretrained": False}
        )
        for name in default_grid_optimizers()
    },
}


def optimizer_display_names() -> dict[str, str]:
    """Label -> display name for every registered optimizer and named variant, in table order."""
    names = {name: OPTIMIZERS[name].display_name for name in optimizers_in_order()}
    return {**names, **{label: variant.display_name for label, variant in VARIANTS.items()}}
