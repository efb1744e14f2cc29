"""Data sets, image loading, transforms and collation (formats in docs/protocol.md).

Three sets feed a run:

* :class:`TrainPairs`  - image-caption pairs, a JSON list of
  ``{"image": <path relative to the image root>, "caption": str, "image_id": int}``.
* :class:`RetrievalSet` - images with several captions each, a JSON list of
  ``{"image": <relative path>, "caption": [str, ...]}``.
* :class:`~clipstudy.data.zeroshot.ZeroShotSet` - an ImageFolder (one folder per
  class id, sorted order = class index) plus class names and prompt templates
  (in :mod:`clipstudy.data.zeroshot`).

Annotation files are validated when a set is built (:class:`DataError`, naming
the file, the entry and the fix); an image path that would leave its image
root (absolute, or climbing out with ``..``) is such an error. Images are
read lazily: an unreadable image makes ``__getitem__`` return ``None`` with a
warning, and the collate functions drop it, so one bad file never stops an
epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from clipstudy.data.images import (  # noqa: F401 (API)
    AUGMENTS,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ZEROSHOT_TRANSFORMS,
    Compose,
    ImageReader,
    UnreadableImage,
    eval_transform,
    load_rgb_image,
    train_transform,
    transforms_for,
    zeroshot_transform,
)
from clipstudy.errors import StartupError

log = logging.getLogger("clipstudy.data.datasets")

# The zero-shot set and the ImageNet/CLIP metadata are in clipstudy.data.zeroshot.

TRAIN_FORMAT = '{"image": <path relative to the image root>, "caption": <str>, "image_id": <int or str>}'
RETRIEVAL_FORMAT = '{"image": <path relative to the image root>, "caption": [<str>, ...]}'


class DataError(StartupError):
    """A data set cannot be used as given (bad annotation file, missing folder...).

    Raised when a set is built, never mid-epoch; the message names the file or
    folder, what is wrong and how to fix it. Training also raises it at the end
    of an epoch in which no image of the training set could be read.
    """


# --------------------------------------------------------------------------- captions

_APOSTROPHES = re.compile(r"['\u2019]")
_NOT_WORD = re.compile(r"[\W_]+")  # anything but letters and digits (any script)


def clean_caption(text: str, max_words: int = 30) -> str:
    """Caption as the study feeds it to the tokenizer.

    Lower-cased; apostrophes removed (``"don't"`` -> ``"dont"``); every other run
    of characters that are not letters or digits becomes one space (so
    ``"top-left"`` -> ``"top left"``); leading/trailing space stripped; at most
    ``max_words`` words (default 30, docs/protocol.md).
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_caption expects a str, got {type(text).__name__}")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    words = _NOT_WORD.sub(" ", _APOSTROPHES.sub("", text.lower())).split()
    return " ".join(words[:max_words])


# --------------------------------------------------------------------------- annotation files


def load_annotation_list(ann_file: str | os.PathLike, kind: str) -> list[dict]:
    """Read and validate an annotation file; ``kind`` is ``"train"`` or ``"retrieval"``.

    Returns the (possibly empty) list of entries. Raises :class:`DataError`
    naming the file and the first problems found.
    """
    if kind not in ("train", "retrieval"):
        raise ValueError(f"kind must be 'train' or 'retrieval', got {kind!r}")
    expected = TRAIN_FORMAT if kind == "train" else RETRIEVAL_FORMAT
    path = Path(ann_file)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; pass the path of a JSON list of {expected}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); the file must be a JSON list of {expected}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: top level is a JSON {type(entries).__name__}, expected a list of {expected}")
    problems = []
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry, kind)
        if problem:
            problems.append(f"entry {i} {problem}")
            if len(problems) == 5:
                break
    if problems:
        raise DataError(f"{path}: {'; '.join(problems)}. Each entry must be {expected}")
    return entries


def _entry_problem(entry: Any, kind: str) -> str | None:
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    missing = [key for key in ("image", "caption") if key not in entry]
    if missing:
        return f"has no {', '.join(repr(k) for k in missing)} key"
    if not isinstance(entry["image"], str) or not entry["image"]:
        return "has an 'image' that is not a non-empty string"
    if _outside_root(entry["image"]):
        return (
            f"has an 'image' path {entry['image']!r} that leads outside the image root (absolute, or "
            "climbing out with '..'); write it relative to the image root"
        )
    caption = entry["caption"]
    if kind == "train":
        if not isinstance(caption, str):
            return f"has a 'caption' of type {type(caption).__name__}, expected a string"
        # image_id is not used for training (per-sample state is keyed by the
        # dataset index), so it may be absent; if present it must be an id.
        image_id = entry.get("image_id", 0)
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            return f"has an 'image_id' of type {type(image_id).__name__}, expected an int or string"
    else:
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            return "has a 'caption' that is neither a string nor a list of strings"
        if not captions:
            return "has an empty caption list"
    return None


def _outside_root(relative: str) -> bool:
    """Whether an annotation's image path would resolve outside its image root.

    Absolute paths (``root / "/etc/x"`` is ``/etc/x``) and paths that climb
    above the root once normalised (``"../x"``, ``"a/../../x"``) do; ``"a/../b"``
    does not.
    """
    if os.path.isabs(relative):
        return True
    return os.path.normpath(relative).split(os.sep)[0] == ".."


def _warn_empty_captions(ann_file: str | os.PathLike, cleaned: Sequence[str]) -> int:
    """Log one warning counting the captions that clean to nothing; returns the count."""
    empty = [i for i, caption in enumerate(cleaned) if not caption]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        log.warning(
            "%s: %d of %d captions are empty after cleaning (caption numbers %s); they are used as "
            "empty texts. `python -m clipstudy check-data` counts them",
            ann_file,
            len(empty),
            len(cleaned),
            shown,
        )
    return len(empty)


def _require_dir(folder: str | os.PathLike, what: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise DataError(
            f"{path}: {what} folder not found; pass the folder the annotation's image paths are relative to"
        )
    return path


# --------------------------------------------------------------------------- data sets


class _AnnotatedImages(Dataset):
    """What :class:`TrainPairs` and :class:`RetrievalSet` share: an annotation file of images
    relative to an image root, read through one :class:`ImageReader`."""

    kind = ""  # the annotation format: "train" or "retrieval"
    empty_message = ""  # why an empty annotation list cannot be used

    def _load(self, ann_file, image_root, transform, cache_images: bool) -> list[dict]:
        entries = load_annotation_list(ann_file, self.kind)
        if not entries:
            raise DataError(f"{ann_file}: the annotation list is empty; {self.empty_message}")
        self.ann_file = str(ann_file)
        self.image_root = _require_dir(image_root, "image root")
        self.transform = transform
        self.images = [entry["image"] for entry in entries]
        self._reader = ImageReader(cache_images)
        return entries

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]

    def _image(self, index: int):
        """The transformed image ``index``, or None when it cannot be read (warned once)."""
        image = self._reader.read(index, self.image_path(index))
        return None if image is None else self.transform(image)


class TrainPairs(_AnnotatedImages):
    """Image-caption training pairs (docs/protocol.md train format).

    Args:
        ann_file: JSON list of ``{"image", "caption", "image_id"}``.
        image_root: folder the ``image`` paths are relative to.
        transform: PIL RGB image -> tensor (see :func:`train_transform`).
        max_words: caption word cap of :func:`clean_caption` (default 30).

    Attributes:
        images: image paths as written in the file; ``captions``: cleaned
        captions; ``image_ids``: the ``image_id`` values (``None`` if absent);
        ``empty_captions``: how many captions clean to nothing (logged once;
        they are kept as empty texts). Repeated ``image_id`` values are
        allowed (one image with several captions); check-data counts them.

    ``dataset[i]`` is ``(image_tensor, caption, i)``; ``i`` addresses per-sample
    loss state. It is ``None`` when the image cannot be read (warning logged).
    """

    kind, empty_message = "train", "a training set needs at least one pair"

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Callable,
        max_words: int = 30,
        cache_images: bool = False,
    ):
        entries = self._load(ann_file, image_root, transform, cache_images)
        self.captions = [clean_caption(entry["caption"], max_words) for entry in entries]
        self.empty_captions = _warn_empty_captions(ann_file, self.captions)
        self.image_ids = [entry.get("image_id") for entry in entries]

    def __getitem__(self, index: int):
        image = self._image(index)
        return None if image is None else (image, self.captions[index], index)


class RetrievalSet(_AnnotatedImages):
    """Images with several captions each, for image-text retrieval (docs/protocol.md format).

    Args:
        ann_file: JSON list of ``{"image", "caption": [str, ...]}`` (a single
            string caption is accepted too).
        image_root: folder the ``image`` paths are relative to.
        transform: PIL RGB image -> tensor (see :func:`eval_transform`).
        max_words: caption word cap (default 30).

    Attributes:
        images: image paths; ``texts``: every cleaned caption, image by image;
        ``txt2img[t]``: image index of text ``t``; ``img2txt[i]``: text indices
        of image ``i``; ``empty_captions``: how many texts clean to nothing (logged).

    ``dataset[i]`` is ``(image_tensor, i)``, or ``None`` for an unreadable image.
    """

    kind, empty_message = "retrieval", "a retrieval set needs at least one image"

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        transform: Callable,
        max_words: int = 30,
        cache_images: bool = False,
    ):
        entries = self._load(ann_file, image_root, transform, cache_images)
        self.texts: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for image_index, entry in enumerate(entries):
            captions = [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            for caption in captions:
                self.texts.append(clean_caption(caption, max_words))
                self.txt2img.append(image_index)
        self.empty_captions = _warn_empty_captions(ann_file, self.texts)

    def __getitem__(self, index: int):
        image = self._image(index)
        return None if image is None else (image, index)


def require_readable_image(dataset, what: str, source: str) -> int:
    """Index of the first image of ``dataset`` that decodes; :class:`DataError` if none does.

    Run at start-up so a data set whose every image is missing or broken fails in
    seconds, naming its files, instead of after an epoch of training. It stops
    at the first readable image, so a healthy data set costs one read.

    Args:
        dataset: a :class:`TrainPairs`, :class:`RetrievalSet` or :class:`ZeroShotSet`
            (anything with ``__len__`` and ``image_path(i)``).
        what: the data set's role in messages (``"training"``, ``"retrieval"``, ...).
        source: the annotation file or folder to name in the message.
    """
    first_error = None
    for index in range(len(dataset)):
        try:
            load_rgb_image(dataset.image_path(index))
            return index
        except UnreadableImage as error:
            first_error = first_error or error
    detail = f" (first: {first_error.path}: {first_error.reason})" if first_error else " (it has no images)"
    raise DataError(
        f"{source}: none of the {len(dataset)} {what} images can be read{detail}. "
        f"Run `python -m clipstudy check-data` on it to list the missing or broken files"
    )


# --------------------------------------------------------------------------- collation


def readable(batch: list) -> list:
    """The items of a batch that could be read (data sets return None for an unreadable image)."""
    return [item for item in batch if item is not None]


class CaptionCollate:
    """Collate for :class:`TrainPairs`: drops unreadable items, tokenises the captions.

    A class (not a closure) so DataLoader workers can pickle it. Returns
    ``{"images": [B,3,H,W], "input_ids": [B,L], "attention_mask": [B,L],
    "index": [B], "skipped": int}``; B may be 0 when every item was unreadable
    (the caller skips such a batch).
    """

    def __init__(self, tokenizer, max_length: int = 30):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: list) -> dict[str, Any]:
        kept = readable(batch)
        skipped = len(batch) - len(kept)
        if not kept:
            empty_tokens = torch.zeros((0, self.max_length), dtype=torch.long)
            return {
                "images": torch.zeros((0, 3, 0, 0)),
                "input_ids": empty_tokens,
                "attention_mask": empty_tokens.clone(),
                "index": torch.zeros(0, dtype=torch.long),
                "skipped": skipped,
            }
        images, captions, indices = zip(*kept)
        tokens = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "images": torch.stack(images),
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "index": torch.tensor(indices, dtype=torch.long),
            "skipped": skipped,
        }


def make_collate(tokenizer, max_length: int = 30) -> CaptionCollate:
    """The training collate function (see :class:`CaptionCollate`); max_length default 30."""
    return CaptionCollate(tokenizer, max_length)


def collate_skip_none(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for the evaluation sets: drops ``None`` items.

    Returns ``(images [B,3,H,W], ids_or_labels [B])``; B may be 0.
    """
    kept = readable(batch)
    if not kept:
        return torch.zeros((0, 3, 0, 0)), torch.zeros(0, dtype=torch.long)
    images, ids = zip(*kept)
    return torch.stack(images), torch.tensor(ids, dtype=torch.long)
