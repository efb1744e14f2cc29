"""The original code base's training augmentation and zero-shot transform, against hand-worked cases."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from clipstudy.data.augment import ALBEF_OPS, AlbefRandomAugment, albef_op_argument, apply_albef_op
from clipstudy.data.datasets import CLIP_MEAN, CLIP_STD, eval_transform, train_transform, zeroshot_transform


def test_op_list_is_the_original_one():
    assert ALBEF_OPS == (
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
    augment = AlbefRandomAugment()
    assert (augment.num_ops, augment.magnitude, augment.prob, augment.ops) == (2, 7, 0.5, ALBEF_OPS)
    with pytest.raises(ValueError, match="Solarize"):
        AlbefRandomAugment(ops=("Rotate", "Solarize"))


@pytest.mark.parametrize(
    "name, at7, at10, signed",
    [
        ("Rotate", 21.0, 30.0, True),  # 30 deg x m/10
        ("ShearX", 0.21, 0.3, True),  # 0.3 x m/10
        ("ShearY", 0.21, 0.3, True),
        ("TranslateX", 7.0, 10.0, True),  # 10 px x m/10, whatever the image size
        ("TranslateY", 7.0, 10.0, True),
        ("Brightness", 1.36, 1.9, False),  # 0.1 + 1.8 m/10, never negated
        ("Sharpness", 1.36, 1.9, False),
    ],
)
def test_magnitude_mapping(name, at7, at10, signed):
    assert albef_op_argument(name, 7) == pytest.approx(at7)
    assert albef_op_argument(name, 10) == pytest.approx(at10)
    assert albef_op_argument(name, 7, negate=True) == pytest.approx(-at7 if signed else at7)
    for name in ("Identity", "AutoContrast", "Equalize"):
        assert albef_op_argument(name, 7) is None


def _bar_centroid(pixels: np.ndarray, row: int) -> float:
    values = pixels[row].astype(float)
    values[values == 128] = 0  # the grey fill is not the bar
    return float((values * np.arange(values.size)).sum() / values.sum())


def test_shear_moves_each_row_by_021_times_its_height():
    # A vertical bar at x = 16; ShearX about the top-left corner by factor 0.21 moves row y by
    # 0.21 (y + 0.5) pixels (pixel centres at y + 0.5): rows 0 and 20 end 4.2 px apart.
    # torchvision's RandAugment(2, 7) would shear by 0.07 (1.4 px).
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16] = 255
    for negate, sign in ((True, +1), (False, -1)):
        out = np.asarray(apply_albef_op(Image.fromarray(image), "ShearX", albef_op_argument("ShearX", 7, negate)))
        shift = _bar_centroid(out[..., 0], 20) - _bar_centroid(out[..., 0], 0)
        assert shift == pytest.approx(sign * 0.21 * 20, abs=0.05)


@pytest.mark.parametrize("name, moved", [("TranslateX", (10, 19)), ("TranslateY", (17, 12))])
def test_translate_moves_seven_pixels_and_fills_grey(name, moved):
    image = np.zeros((32, 32, 3), np.uint8)
    image[10, 12] = 255
    out = np.asarray(apply_albef_op(Image.fromarray(image), name, albef_op_argument(name, 7)))
    assert [tuple(p) for p in np.argwhere(out[..., 0] == 255)] == [moved]
    uncovered = out[:, :7] if name == "TranslateX" else out[:7]
    assert (uncovered == 128).all()  # grey fill where the image moved away


def test_rotate_21_degrees_with_grey_corners():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = np.asarray(apply_albef_op(white, "Rotate", albef_op_argument("Rotate", 7)))
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        assert tuple(corner) == (128, 128, 128)
    assert (out[24:40, 24:40] == 255).all()
    # the angle: a horizontal bar through the centre becomes a line of slope tan(21 deg)
    bar = np.zeros((64, 64, 3), np.uint8)
    bar[31:33, :] = 255
    out = np.asarray(apply_albef_op(Image.fromarray(bar), "Rotate", 21.0))[..., 0].astype(float)
    out[out == 128] = 0
    rows = np.arange(64)[:, None]
    centre_row = (out * rows).sum(axis=0) / np.maximum(out.sum(axis=0), 1)
    slope = (centre_row[20] - centre_row[44]) / 24  # counter-clockwise: the right side goes up
    assert math.degrees(math.atan(slope)) == pytest.approx(21.0, abs=1.0)


def _outcomes(augment: AlbefRandomAugment, image: Image.Image, n: int) -> Counter:
    torch.manual_seed(0)
    return Counter(int(np.asarray(augment(image))[0, 0, 0]) for _ in range(n))


def test_each_drawn_op_applies_with_probability_one_half():
    # Only Brightness (x 1.36 at m = 7) on a constant 100 image: 100 (neither of the two drawn ops
    # applied, 1/4), 136 (one, 1/2) or 136 x 1.36 = 185 (both, 1/4).
    counts = _outcomes(AlbefRandomAugment(ops=("Brightness",)), Image.new("RGB", (4, 4), (100,) * 3), 4000)
    twice = counts[184] + counts[185]
    assert set(counts) <= {100, 136, 184, 185}
    assert counts[100] / 4000 == pytest.approx(0.25, abs=0.03)
    assert counts[136] / 4000 == pytest.approx(0.50, abs=0.03)
    assert twice / 4000 == pytest.approx(0.25, abs=0.03)


def test_ops_are_drawn_with_replacement():
    # Brightness or Identity, always applied: Brightness twice has probability 1/4 with replacement
    # (0 without), once 1/2, never 1/4.
    augment = AlbefRandomAugment(ops=("Brightness", "Identity"), prob=1.0)
    counts = _outcomes(augment, Image.new("RGB", (4, 4), (100,) * 3), 4000)
    assert (counts[184] + counts[185]) / 4000 == pytest.approx(0.25, abs=0.03)
    assert counts[136] / 4000 == pytest.approx(0.50, abs=0.03)


def test_seeded_draws_repeat():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    augment = AlbefRandomAugment()
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append([np.asarray(augment(image)) for _ in range(10)])
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    assert not all(np.array_equal(runs[0][0], out) for out in runs[0][1:])


def test_train_transform_augment_choice():
    def kinds(transform):
        return [type(step).__name__ for step in transform.transforms]

    assert "AlbefRandomAugment" in kinds(train_transform(16, augment="albef"))
    assert "RandAugment" in kinds(train_transform(16, augment="torchvision"))
    none = train_transform(16, crop_scale=None, hflip=False, augment="none")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert torch.equal(none(image), eval_transform(16)(image))
    with pytest.raises(ValueError, match="augment"):
        train_transform(16, augment="autoaugment")


# ------------------------------------------------------------------ zero-shot transform
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _striped(width=80, height=20):
    # left 20 px red-ish, middle 40 px green-ish, right 20 px blue-ish
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :20] = (200, 40, 40)
    image[:, 20:60] = (60, 180, 90)
    image[:, 60:] = (30, 50, 220)
    return Image.fromarray(image)


def _normalised(colour, mean, std):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std)])


def test_original_zeroshot_transform_resizes_short_side_crops_centre_and_uses_imagenet_stats():
    # 80x20 -> shorter side 10: 40x10; centre crop 10x10 keeps columns 15..24 of the 40, i.e. input
    # columns 30..49, all inside the middle stripe: every output pixel is the middle colour,
    # normalised with ImageNet's mean and std.
    out = zeroshot_transform(10, "original")(_striped())
    assert out.shape == (3, 10, 10)
    expected = _normalised((60, 180, 90), IMAGENET_MEAN, IMAGENET_STD).view(3, 1, 1).expand(3, 10, 10)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_clip_zeroshot_transform_squashes_the_whole_image_with_clip_stats():
    out = zeroshot_transform(10, "clip")(_striped())
    assert out.shape == (3, 10, 10)
    torch.testing.assert_close(out[:, 5, 0], _normalised((200, 40, 40), CLIP_MEAN, CLIP_STD), atol=0.05, rtol=0)
    torch.testing.assert_close(out[:, 5, 9], _normalised((30, 50, 220), CLIP_MEAN, CLIP_STD), atol=0.05, rtol=0)
    assert torch.equal(out, eval_transform(10)(_striped()))
    with pytest.raises(ValueError, match="zeroshot_transform"):
        zeroshot_transform(10, "imagenet")
