"""The zero-shot classification set and the ImageNet / CLIP metadata it defaults to.

:class:`ZeroShotSet` is an ImageFolder (one folder per class id, sorted order =
class index) plus class names and prompt templates; :func:`scan_image_folder`
lists such a folder. The ImageNet-1k WordNet ids, class names and CLIP's 80
prompt templates come from a data file shipped with the package.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from clipstudy.data.datasets import DataError, _require_dir
from clipstudy.data.images import ImageReader

# The ImageNet class names and CLIP's 80 templates are kept as a data file
# rather than a dependency on open_clip_torch, which would pull in ftfy and
# more for two constants. Sources and licences are
# recorded inside the file.
_METADATA_FILE = "imagenet_metadata.json"


@functools.lru_cache(maxsize=1)
def _imagenet_metadata() -> dict:
    text = importlib.resources.files("clipstudy").joinpath("resources", _METADATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in sorted order (= class index order)."""
    return list(_imagenet_metadata()["wnids"])


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names used for CLIP zero-shot, in class index order."""
    return list(_imagenet_metadata()["classnames"])


def clip_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates, each with one ``"{}"`` for the class name."""
    return list(_imagenet_metadata()["templates"])


def _check_templates(templates: Sequence[str], where: str) -> list[str]:
    templates = list(templates)
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if not templates or bad:
        raise DataError(
            f"{where}: templates must be a non-empty list of strings with exactly one '{{}}' "
            f"for the class name, e.g. 'a photo of a {{}}.'; bad: {bad[:3]}"
        )
    return templates


class ZeroShotSet(Dataset):
    """An ImageFolder for zero-shot classification, with class names and prompt templates.

    One sub-folder per class id under ``root``; sorted folder order is the class
    index (torchvision's ``find_classes``). Files with image extensions are the
    samples; empty class folders are allowed (the class stays in the classifier).

    Class names and templates, each resolved on its own, first match wins:

    1. the ``classnames`` / ``templates`` arguments (``classnames`` a list in
       class index order or a mapping folder id -> name);
    2. ``root/classnames.json``: ``{"classnames": {folder_id: name}, "templates": [...]}``
       (``templates`` optional there);
    3. folder ids that are all ImageNet WordNet ids: the shipped ImageNet names;
    4. the folder names with underscores as spaces.

    Templates default to CLIP's 80 ImageNet templates.

    Attributes:
        classes: folder ids; ``classnames``; ``templates``; ``samples``: (path,
        label) pairs; ``targets``: labels.

    ``dataset[i]`` is ``(image_tensor, label)``, or ``None`` for an unreadable image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable,
        classnames: Sequence[str] | Mapping[str, str] | None = None,
        templates: Sequence[str] | None = None,
        cache_images: bool = False,
    ):
        self.root = _require_dir(root, "zero-shot image")
        self.transform = transform
        self.classes, self.class_to_idx, self.samples = scan_image_folder(self.root)
        if not self.samples:
            raise DataError(f"{self.root}: no image files in any class folder (extensions {', '.join(IMG_EXTENSIONS)})")
        self.targets = [label for _, label in self.samples]
        file_names, file_templates = self._read_classnames_json()
        self.classnames = self._resolve_names(classnames, file_names)
        if templates is not None:
            self.templates = _check_templates(templates, "ZeroShotSet(templates=...)")
        elif file_templates is not None:
            self.templates = _check_templates(file_templates, str(self.root / "classnames.json"))
        else:
            self.templates = clip_templates()
        self._reader = ImageReader(cache_images)

    def _read_classnames_json(self) -> tuple[dict | None, list | None]:
        path = self.root / "classnames.json"
        if not path.is_file():
            return None, None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(
                f"{path}: not valid JSON ({error}); expected "
                '{"classnames": {folder_id: name}, "templates": ["a photo of a {}.", ...]}'
            ) from None
        names = meta.get("classnames") if isinstance(meta, dict) else None
        if not isinstance(names, dict):
            raise DataError(f"{path}: needs a 'classnames' object mapping each folder id to a class name")
        return names, meta.get("templates")

    def _resolve_names(self, given, from_file: dict | None) -> list[str]:
        if given is not None:
            if isinstance(given, Mapping):
                return self._names_from_mapping(given, "ZeroShotSet(classnames=...)")
            given = list(given)
            if len(given) != len(self.classes):
                raise DataError(
                    f"ZeroShotSet(classnames=...): {len(given)} names for {len(self.classes)} "
                    f"class folders in {self.root}; give one name per folder, in sorted folder order"
                )
            return given
        if from_file is not None:
            return self._names_from_mapping(from_file, str(self.root / "classnames.json"))
        wnid_index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        if all(folder in wnid_index for folder in self.classes):
            names = imagenet_classnames()
            return [names[wnid_index[folder]] for folder in self.classes]
        return [folder.replace("_", " ") for folder in self.classes]

    def _names_from_mapping(self, names: Mapping[str, str], where: str) -> list[str]:
        missing = [folder for folder in self.classes if folder not in names]
        if missing:
            raise DataError(
                f"{where}: no class name for folder(s) {missing[:5]} of {self.root}; "
                "add an entry folder_id -> name for every class folder"
            )
        return [str(names[folder]) for folder in self.classes]

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, index: int) -> Path:
        return Path(self.samples[index][0])

    def __getitem__(self, index: int):
        image = self._reader.read(index, self.image_path(index))
        if image is None:
            return None
        return self.transform(image), self.samples[index][1]


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    """``(classes, class_to_idx, samples)`` of an ImageFolder, empty class folders allowed.

    Raises :class:`DataError` when ``root`` is missing or has no class folder.
    """
    root = _require_dir(root, "zero-shot image")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise DataError(f"{root}: no class sub-folders; expected one folder per class holding its images") from None
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    return classes, class_to_idx, samples
