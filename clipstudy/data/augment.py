"""The original code base's training augmentation, rebuilt from torchvision's functional ops.

The study's code base augments training images with ALBEF's ``RandomAugment(2,
7)`` restricted to ten operations. It is not torchvision's ``RandAugment(2, 7)``
(which has other operations, a 31-step magnitude scale and always applies
its operations). :class:`AlbefRandomAugment` reproduces its rules:

* **Choice.** Each call draws ``num_ops`` (2) operations uniformly from the
  list, *with* replacement (the same operation can come twice).
* **Probability.** Each drawn operation is then applied with probability 0.5
  (a uniform draw ``u`` applies it when ``u <= 0.5``), independently.
* **Magnitude** ``m`` on a 0-10 scale (7), mapped per operation:

  ==================  ====================================  ===========  ==========
  operation           argument                              at m = 7     random sign
  ==================  ====================================  ===========  ==========
  Brightness          factor 0.1 + 1.8 m / 10               1.36         no
  Sharpness           factor 0.1 + 1.8 m / 10               1.36         no
  ShearX, ShearY      shear factor 0.3 m / 10               0.21         yes
  TranslateX, -Y      offset 10 m / 10 pixels (absolute)    7 px         yes
  Rotate              angle 30 m / 10 degrees               21 deg       yes
  ==================  ====================================  ===========  ==========

  Identity, AutoContrast and Equalize take no argument.

  "Random sign": the argument is negated with probability 0.5, drawn each
  time the operation is applied. Brightness and Sharpness are never negated,
  so at m = 7 they always brighten and sharpen. The translation is in pixels
  whatever the image size (7 px of a 256 px image).
* **Fill.** Geometric operations fill uncovered pixels with grey (128, 128, 128)
  and interpolate bilinearly. Shears are about the top-left corner (the
  original's affine matrix has no centre term); rotations are about the centre.

Randomness comes from torch's global generator, which the training loop seeds
per sample, so runs are repeatable. Differences from the original:

* below one pixel or one grey level: rotation about the exact centre (the
  original's cv2 centre is half a pixel off), the shear's and translation's
  direction under a given sign (irrelevant, the sign is random), and Pillow's
  rounding in Brightness;
* a deliberate correction, not below one grey level: the original's Sharpness
  casts the filtered image to uint8 *without clipping*, so a value above 255
  wraps around to a dark one (and below 0 to a bright one) at bright or dark
  edges. Here Sharpness is torchvision's ``adjust_sharpness``, which clips to
  [0, 255]; the wrap is an overflow bug, not an augmentation, and is not
  reproduced (docs/protocol.md lists it with the other corrections).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

ALBEF_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
MAX_LEVEL = 10.0
GREY = (128, 128, 128)
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


def albef_op_argument(name: str, magnitude: float, negate: bool = False) -> float | None:
    """The argument of operation ``name`` at ``magnitude`` (0-10 scale); see the module table.

    ``negate`` flips the sign for the signed operations and is ignored by the
    others. Returns ``None`` for operations without an argument.
    """
    level = magnitude / MAX_LEVEL
    if name in ("Identity", "AutoContrast", "Equalize"):
        return None
    if name in ("Brightness", "Sharpness"):
        return 0.1 + 1.8 * level
    if name in ("ShearX", "ShearY"):
        value = 0.3 * level
    elif name in ("TranslateX", "TranslateY"):
        value = 10.0 * level
    elif name == "Rotate":
        value = 30.0 * level
    else:
        raise ValueError(f"unknown augmentation operation {name!r}; choose from {ALBEF_OPS}")
    return -value if negate else value


def apply_albef_op(image: Image.Image, name: str, argument: float | None, fill: Sequence[int] = GREY) -> Image.Image:
    """Apply one operation with its argument (from :func:`albef_op_argument`) to a PIL image."""
    bilinear, fill = InterpolationMode.BILINEAR, list(fill)
    if name == "Identity":
        return image
    if name == "AutoContrast":
        return F.autocontrast(image)
    if name == "Equalize":
        return F.equalize(image)
    if name == "Brightness":
        return F.adjust_brightness(image, argument)
    if name == "Sharpness":
        return F.adjust_sharpness(image, argument)
    if name in ("ShearX", "ShearY"):
        # torchvision takes shear angles; a shear factor s is the angle atan(s)
        angle = math.degrees(math.atan(argument))
        shear = [angle, 0.0] if name == "ShearX" else [0.0, angle]
        return F.affine(
            image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=bilinear, fill=fill, center=[0, 0]
        )
    if name in ("TranslateX", "TranslateY"):
        translate = [argument, 0.0] if name == "TranslateX" else [0.0, argument]
        return F.affine(
            image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=bilinear, fill=fill
        )
    if name == "Rotate":
        return F.rotate(image, argument, interpolation=bilinear, fill=fill)
    raise ValueError(f"unknown augmentation operation {name!r}; choose from {ALBEF_OPS}")


class AlbefRandomAugment:
    """ALBEF's ``RandomAugment`` as the study's code base used it (PIL image -> PIL image).

    Args:
        num_ops: operations drawn per image, with replacement (default 2).
        magnitude: 0-10 scale (default 7).
        ops: operation names (default :data:`ALBEF_OPS`, the original's list).
        prob: probability that each drawn operation is applied (default 0.5).
        fill: colour of uncovered pixels (default grey 128).
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 7,
        ops: Sequence[str] = ALBEF_OPS,
        prob: float = 0.5,
        fill: Sequence[int] = GREY,
    ):
        unknown = [op for op in ops if op not in ALBEF_OPS]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty list from {ALBEF_OPS}, got unknown {unknown}")
        if num_ops < 0 or not 0 <= magnitude <= MAX_LEVEL or not 0 <= prob <= 1:
            raise ValueError(
                f"need num_ops >= 0, 0 <= magnitude <= 10, 0 <= prob <= 1; got {num_ops}, {magnitude}, {prob}"
            )
        self.num_ops, self.magnitude, self.ops, self.prob, self.fill = num_ops, magnitude, tuple(ops), prob, fill

    def __call__(self, image: Image.Image) -> Image.Image:
        chosen = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        for op_index in chosen:
            if float(torch.rand(())) > self.prob:
                continue
            name = self.ops[op_index]
            negate = name in _SIGNED and float(torch.rand(())) < 0.5
            image = apply_albef_op(image, name, albef_op_argument(name, self.magnitude, negate), self.fill)
        return image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, prob={self.prob}, "
            f"ops={list(self.ops)})"
        )
