"""The layout of a data folder: the one place that says which file or folder holds what.

A data folder made by ``make-demo-data`` or by ``prepare-data`` (all sources
into one ``--out``) holds the files below; ``--data DIR`` (the ``data`` field)
is shorthand for every path in it. An explicit path field wins over the
shorthand, so a data set can also be spread over several places.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

#: field (or record) -> its name inside a data folder
LAYOUT: dict[str, str] = {
    "train_ann": "train.json",
    "train_images": "images",
    "retrieval_ann": "retrieval.json",
    "retrieval_images": "images",
    "zeroshot_images": "zeroshot",
    "val_retrieval_ann": "val_retrieval.json",
    "val_retrieval_images": "images",
    "val_zeroshot_images": "val_zeroshot",
    "tokenizer": "tokenizer",
    "manifest": "manifest.json",  # the demo generator's record of what it made
    "scenes": "scenes.json",  # the demo generator's scene parameters
}
#: the path fields of a run configuration that the layout fills in
DATA_PATH_FIELDS = (
    "train_ann",
    "train_images",
    "retrieval_ann",
    "retrieval_images",
    "zeroshot_images",
    "val_retrieval_ann",
    "val_retrieval_images",
    "val_zeroshot_images",
    "tokenizer",
)
#: what a folder passed as ``data`` must hold before anything else is checked
REQUIRED = ("train_ann", "train_images")


def layout(folder: str | Path) -> dict[str, Path]:
    """Every path of the layout inside ``folder``."""
    return {key: Path(folder) / name for key, name in LAYOUT.items()}


def resolve_paths(fields: Mapping[str, str], *, needs_tokenizer: bool) -> dict[str, str]:
    """The data paths of a configuration's fields: explicit paths, else the ``data`` folder's layout.

    ``fields`` holds ``data`` and the :data:`DATA_PATH_FIELDS` (a configuration as a
    dict, or a run's recorded ``config.json``). The tokenizer comes from the
    folder only when the text tower needs the data set's own (``needs_tokenizer``).
    """
    base = layout(fields["data"]) if fields.get("data") else None
    out = {}
    for key in DATA_PATH_FIELDS:
        value = fields.get(key) or ""
        use_base = base is not None and not value and (key != "tokenizer" or needs_tokenizer)
        out[key] = str(base[key]) if use_base else value
    return out
