"""Reading images and turning them into tensors: decoding, the reader every data set uses, transforms.

Every image of every set goes through :func:`load_rgb_image` (any common mode
to 8-bit RGB, or :class:`UnreadableImage`) by way of an :class:`ImageReader`
(one warning per bad file, optional in-memory cache); the transforms are the
study's training augmentation and evaluation resize.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from clipstudy.data.augment import AlbefRandomAugment

log = logging.getLogger("clipstudy.data.datasets")

# CLIP's normalisation (Radford et al. 2021), used by the study's code base.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's, which the code base's zero-shot transform used (see zeroshot_transform).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnreadableImage(Exception):
    """An image file that cannot be decoded: missing, empty, truncated or not an image."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------- images


def _white_composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's own convert("L") from I;16 clips at 255 instead of scaling; map the
    # 16-bit range 0..65535 linearly onto 0..255 (x / 257, rounded).
    values = np.asarray(image, dtype=np.float64)
    gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file of any common mode and return it as 8-bit RGB.

    * Alpha (LA, RGBA, PA, P or L/RGB with a transparency entry) is composited
      on a white background, so transparent regions come out white.
    * 16-bit and 32-bit integer grayscale (``I;16*``, ``I``; e.g. a 16-bit PNG)
      is scaled from 0..65535 to 0..255 (value / 257, rounded; larger values
      saturate), not clipped.
    * CMYK, 1-bit, palette, YCbCr and the rest use Pillow's conversion.
    * Only the first frame of a multi-frame file is used; EXIF orientation is
      not applied (as in the study's code base).

    Raises:
        UnreadableImage: the file is missing, empty, truncated, or not an image.
    """
    path = os.fspath(path)
    try:
        status = os.stat(path)  # one system call for existence, kind and size (this runs per sample)
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except OSError as error:
        raise UnreadableImage(path, f"cannot stat file: {error}") from None
    if stat.S_ISDIR(status.st_mode):
        raise UnreadableImage(path, "is a directory, not an image file")
    if status.st_size == 0:
        raise UnreadableImage(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated data fails here, not later in a transform
            has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
            if image.mode.startswith("I;16") or image.mode == "I":
                return _sixteen_bit_to_rgb(image)
            if has_alpha:
                return _white_composite(image)
            return image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise UnreadableImage(path, f"too large to decode safely: {error}") from None
    # Pillow's decoders raise many types for corrupt input (OSError, SyntaxError,
    # ValueError, EOFError, zlib errors...); all mean the same thing here.
    except Exception as error:  # noqa: BLE001
        reason = str(error) or type(error).__name__
        if isinstance(error, Image.UnidentifiedImageError):
            reason = "not a recognised image file"
        elif "truncated" in reason.lower():
            reason = f"truncated image data ({reason})"
        raise UnreadableImage(path, reason) from None


# --------------------------------------------------------------------------- transforms

AUGMENTS = ("albef", "torchvision", "none")
ZEROSHOT_TRANSFORMS = ("original", "clip")


def train_transform(
    image_size: int,
    *,
    crop_scale: tuple[float, float] | None = (0.5, 1.0),
    hflip: bool = True,
    randaugment: tuple[int, int] | None = (2, 7),
    augment: str = "torchvision",
) -> Callable:
    """Training augmentation (PIL RGB image -> normalised tensor).

    Args:
        image_size: output side in pixels.
        crop_scale: area range of ``RandomResizedCrop`` (bicubic); default
            (0.5, 1.0). ``None`` resizes the whole image instead (no crop).
        hflip: random horizontal flip (default True).
        randaugment: ``(num_ops, magnitude)`` of the augmentation; default
            (2, 7); ``None`` disables it (whatever ``augment`` says).
        augment: ``"albef"`` (the original code base's ALBEF RandomAugment, see
            :mod:`clipstudy.data.augment`), ``"torchvision"`` (torchvision's
            ``RandAugment``, the default) or ``"none"``.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    steps: list[Callable] = []
    if crop_scale is None:
        steps.append(T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC))
    else:
        low, high = crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        steps.append(T.RandomResizedCrop(image_size, scale=(low, high), interpolation=T.InterpolationMode.BICUBIC))
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}; choose one of {AUGMENTS}")
    if randaugment is not None and augment != "none":
        num_ops, magnitude = randaugment
        if augment == "albef":
            steps.append(AlbefRandomAugment(num_ops, magnitude))
        else:
            steps.append(T.RandAugment(num_ops=num_ops, magnitude=magnitude))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return Compose(steps)


def eval_transform(image_size: int) -> Callable:
    """Evaluation transform: resize to ``image_size`` x ``image_size`` (bicubic), CLIP normalisation."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return Compose(
        [
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def zeroshot_transform(image_size: int, mode: str = "clip") -> Callable:
    """The zero-shot (ImageNet) evaluation transform.

    ``"original"``: what the study's code base used for ImageNet: resize the
    shorter side to ``image_size`` (bilinear), centre-crop ``image_size`` x
    ``image_size``, and normalise with the *ImageNet* mean and std, although
    training used CLIP's. ``"clip"``: :func:`eval_transform` (the whole image
    squashed to a square, CLIP normalisation), consistent with training and
    with retrieval.
    """
    if mode not in ZEROSHOT_TRANSFORMS:
        raise ValueError(f"zeroshot_transform={mode!r}; choose one of {ZEROSHOT_TRANSFORMS}")
    if mode == "clip":
        return eval_transform(image_size)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def transforms_for(config) -> dict[str, Callable]:
    """The ``train``, ``retrieval`` and ``zeroshot`` transforms of a :class:`~clipstudy.engine.config.RunConfig`."""
    return {
        "train": train_transform(
            config.image_size, crop_scale=(config.crop_scale_min, 1.0), hflip=config.hflip, augment=config.augment
        ),
        "retrieval": eval_transform(config.image_size),
        "zeroshot": zeroshot_transform(config.image_size, config.zeroshot_transform),
    }


class Compose(T.Compose):
    """torchvision's ``Compose`` with a faster, bit-identical ending.

    When the last two steps are ``ToTensor`` and ``Normalize`` and an 8-bit RGB
    PIL image reaches them, they run as one step: the same float32 operations
    in the same order (divide by 255, subtract the mean, divide by the std), so
    the output is identical, without the dozen small tensor operations and
    per-image mean/std tensors of the two separate steps (about half their time).
    Anything else runs exactly as ``T.Compose`` does.
    """

    def __call__(self, image):
        steps = self.transforms
        if len(steps) < 2 or type(steps[-2]) is not T.ToTensor or type(steps[-1]) is not T.Normalize:
            return super().__call__(image)
        for step in steps[:-2]:
            image = step(image)
        normalize = steps[-1]
        if not (isinstance(image, Image.Image) and image.mode == "RGB"):
            return normalize(steps[-2](image))
        mean, std = self._statistics(normalize)
        if mean is None:  # e.g. a zero std: let torchvision raise its own error
            return normalize(steps[-2](image))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # H x W x 3
        tensor = pixels.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div_(255)
        return tensor.sub_(mean).div_(std)

    def _statistics(self, normalize: T.Normalize):
        key = (tuple(normalize.mean), tuple(normalize.std), torch.get_default_dtype())
        cached = getattr(self, "_cached_statistics", None)
        if cached is None or cached[0] != key:
            mean = torch.as_tensor(key[0], dtype=key[2]).view(-1, 1, 1)
            std = torch.as_tensor(key[1], dtype=key[2]).view(-1, 1, 1)
            if mean.numel() not in (1, 3) or std.numel() not in (1, 3) or bool((std == 0).any()):
                mean = std = None
            cached = self._cached_statistics = (key, mean, std)
        return cached[1], cached[2]


class ImageReader:
    """How every data set reads its images: :func:`load_rgb_image`, one warning per bad file.

    ``read`` returns ``None`` for an unreadable file, logging it once per data
    set (not once per epoch). With ``cache=True`` decoded images stay in memory:
    for small data sets read every epoch (the demo: 4000 images of 32 px, 12 MB)
    decoding is a fifth of the data time and needs doing only once. Images are
    deterministic, so caching changes no number. Unreadable files are not
    cached: they are retried (and skipped) each time. Each DataLoader worker
    keeps its own cache; leave it off for large data sets.
    """

    def __init__(self, cache: bool = False):
        self.cache: dict[int, Image.Image] | None = {} if cache else None
        self._warned: set[str] = set()

    def read(self, key: int, path: str | os.PathLike) -> Image.Image | None:
        image = self.cache.get(key) if self.cache is not None else None
        if image is None:
            try:
                image = load_rgb_image(path)
            except UnreadableImage as error:
                if error.path not in self._warned:
                    self._warned.add(error.path)
                    log.warning("skipping unreadable image %s: %s", error.path, error.reason)
                return None
            if self.cache is not None:
                self.cache[key] = image
        return image
