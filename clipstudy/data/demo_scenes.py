"""The demo benchmark's world: what a scene holds, how it is drawn and how it is described.

A scene is one or two coloured shapes (7 colours x 5 shapes) at one of nine
grid positions (with jitter), small or large, on a dark or light background
with a gradient and pixel noise; it is stored as a plain dict (the entries of
``scenes.json``). :func:`random_scene` draws one, :func:`render_scene` draws it
as an image, :func:`captions_for` describes it from several templates and
synonyms. Everything is a function of the random generator passed in, so the
writer (:mod:`clipstudy.data.demo`) and the pretraining corpus
(:mod:`clipstudy.engine.pretrain`) get the same scenes from the same seed.
"""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw

# canonical colour -> (RGB, synonyms used in captions; the canonical word first)
COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "red": ((215, 40, 40), ["red", "crimson", "scarlet"]),
    "orange": ((240, 135, 25), ["orange", "tangerine", "amber"]),
    "yellow": ((240, 215, 40), ["yellow", "golden", "lemon"]),
    "green": ((45, 165, 60), ["green", "emerald", "leafy"]),
    "cyan": ((40, 200, 215), ["cyan", "turquoise", "aqua"]),
    "blue": ((45, 75, 215), ["blue", "cobalt", "sapphire"]),
    "purple": ((150, 55, 190), ["purple", "violet", "plum"]),
}
SHAPES: dict[str, list[str]] = {
    "circle": ["circle", "disc", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge", "triangular shape"],
    "cross": ["cross", "plus sign", "plus"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}
SIZES: dict[str, list[str]] = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
TONES: dict[str, list[str]] = {"dark": ["dark", "dim", "shadowy"], "light": ["light", "pale", "bright"]}
# (row, col) of the 3 x 3 grid -> words
POSITIONS: dict[tuple[int, int], list[str]] = {
    (0, 0): ["top left", "upper left", "top-left corner"],
    (0, 1): ["top", "top middle", "upper center"],
    (0, 2): ["top right", "upper right", "top-right corner"],
    (1, 0): ["left", "left side", "middle left"],
    (1, 1): ["center", "middle", "centre"],
    (1, 2): ["right", "right side", "middle right"],
    (2, 0): ["bottom left", "lower left", "bottom-left corner"],
    (2, 1): ["bottom", "bottom middle", "lower center"],
    (2, 2): ["bottom right", "lower right", "bottom-right corner"],
}
RELATIONS: dict[str, list[str]] = {
    "above": ["above", "over"],
    "below": ["below", "under"],
    "left of": ["to the left of", "left of"],
    "right of": ["to the right of", "right of"],
}

# Fields: c colour, s shape, z size, p position, bg background tone.
SINGLE_TEMPLATES = [
    "a {z} {c} {s} in the {p}",
    "{p}: a {z} {c} {s}",
    "a {c} {s} in the {p}",
    "there is a {z} {c} {s} in the {p} of the image",
    "a {z} {c} {s}",
    "a {c} {s} on a {bg} background",
    "a {z} {c} {s} in the {p}, {bg} background",
    "the {p} holds a {z} {s} coloured {c}",
    "a {c} {s}",
    "one {z} {s}, {c}, {p}",
    "a picture of a {c} {s} placed in the {p}",
    "{c} {s}, {z}, in the {p}",
]
# Fields of the first shape end in 1, of the second in 2; rel relates shape 1 to shape 2.
PAIR_TEMPLATES = [
    "two shapes: a {c1} {s1} and a {z2} {c2} {s2}",
    "a {z1} {c1} {s1} in the {p1} and a {z2} {c2} {s2} in the {p2}",
    "a {c1} {s1} {rel} a {c2} {s2}",
    "a {c1} {s1} and a {c2} {s2}",
    "{p1}: a {c1} {s1}; {p2}: a {c2} {s2}",
    "a {z1} {c1} {s1} {rel} a {z2} {c2} {s2}",
    "a {c1} {s1} in the {p1} next to a {c2} {s2}",
    "two objects on a {bg} background, a {c1} {s1} and a {c2} {s2}",
    "a {c2} {s2} and a {z1} {c1} {s1} in the {p1}",
]
ZEROSHOT_TEMPLATES = [
    "a photo of a {}.",
    "a {} on a plain background.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} in the picture.",
    "an image showing a {}.",
]

CANONICAL_WORD_P = 0.5  # probability a caption uses the canonical word, else a synonym
PAIR_P = 0.4  # share of two-shape images in train and retrieval
SUPERSAMPLE = 4  # shapes are drawn this many times larger, then downsampled (anti-aliasing)
CELL_CENTRES = (0.22, 0.5, 0.78)  # grid cell centres as fractions of the side
JITTER = 0.06
# Every shape has the area of a circle of this radius (fraction of the side),
# so "small" and "large" mean the same area for every shape: small covers
# at most 3.8 % of the image, large at least 7.1 %.
RADIUS = {"small": (0.085, 0.11), "large": (0.15, 0.18)}


# The compositional zero-shot split. These 15 colour x shape combinations never appear before
# evaluation: not in the training images or captions, not in the retrieval sets, not in the towers'
# pretraining images, labels or captions. Every colour and every shape still appears (with two to
# four other partners), so a model can only name "a red circle" by composing what it learnt of
# "red" and of "circle". The zero-shot classes are exactly these combinations. Chosen as three
# consecutive colours per shape (colour index + 3 x shape index mod 7 in {0, 1, 2}), so each shape
# keeps four seen colours and each colour two or three seen shapes.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (colour, shape)
    for i, colour in enumerate(COLOURS)
    for j, shape in enumerate(SHAPES)
    if (i + 3 * j) % len(COLOURS) in (0, 1, 2)
)
SEEN_KINDS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT)


def class_ids() -> list[str]:
    """The zero-shot class ids (``colour_shape``): the held-out combinations, sorted = class index order."""
    return sorted(f"{colour}_{shape}" for colour, shape in HELD_OUT)


def configuration(shape: dict, background: dict) -> tuple:
    """What a shape in a scene is, at the level the generator chooses it: colour, kind, size, grid cell,
    background tone (position jitter, exact colour and noise left out)."""
    return (shape["colour"], shape["shape"], shape["size"], shape["row"], shape["col"], background["tone"])


def overlap_counts(evaluation: list[dict], seen: list[dict]) -> dict[str, int]:
    """How many evaluation scenes share a shape's colour x shape combination, or its whole
    :func:`configuration`, with any shape of the ``seen`` scenes (pretraining or training).

    For the zero-shot sets both counts are 0 by construction (:data:`HELD_OUT`); they are
    counted, not assumed, so a generator change that leaks the label space shows here.
    """
    combos = {(s["colour"], s["shape"]) for scene in seen for s in scene["shapes"]}
    configs = {configuration(s, scene["background"]) for scene in seen for s in scene["shapes"]}
    return {
        "combination": sum(any((s["colour"], s["shape"]) in combos for s in e["shapes"]) for e in evaluation),
        "configuration": sum(
            any(configuration(s, e["background"]) in configs for s in e["shapes"]) for e in evaluation
        ),
    }


# --------------------------------------------------------------------------- scenes


def _cell_centre(rng: np.random.Generator, cell: tuple[int, int], extent: float) -> tuple[float, float]:
    row, col = cell
    # clamp so the shape stays inside the image
    low, high = extent + 0.02, 1 - extent - 0.02
    cx = float(np.clip(CELL_CENTRES[col] + rng.uniform(-JITTER, JITTER), low, high))
    cy = float(np.clip(CELL_CENTRES[row] + rng.uniform(-JITTER, JITTER), low, high))
    return round(cx, 4), round(cy, 4)


def _random_shape(
    rng: np.random.Generator, colour: str, shape: str, cell: tuple[int, int], size: str | None = None
) -> dict:
    size = size or str(rng.choice(list(SIZES)))
    radius = round(float(rng.uniform(*RADIUS[size])), 4)
    cx, cy = _cell_centre(rng, cell, radius * shape_extent(shape))
    base = np.array(COLOURS[colour][0])
    rgb = np.clip(base + rng.integers(-18, 19, size=3), 0, 255)
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "row": cell[0],
        "col": cell[1],
        "cx": cx,
        "cy": cy,
        "radius": radius,
        "rgb": [int(v) for v in rgb],
        "angle": round(float(rng.uniform(-12, 12)), 2),
    }


def _random_background(rng: np.random.Generator) -> dict:
    tone = str(rng.choice(list(TONES)))
    level = rng.uniform(25, 85) if tone == "dark" else rng.uniform(160, 220)
    rgb = np.clip(level + rng.integers(-12, 13, size=3), 0, 255)
    return {
        "tone": tone,
        "rgb": [int(v) for v in rgb],
        "gradient": round(float(rng.uniform(-25, 25)), 2),
        "gradient_angle": round(float(rng.uniform(0, 2 * math.pi)), 4),
        "noise": round(float(rng.uniform(3, 8)), 2),
        "noise_seed": int(rng.integers(2**31)),
    }


def _cell_pairs(both_small: bool) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Ordered pairs of grid cells two shapes may occupy without overlapping.

    Cells two apart on some axis always work; neighbouring cells only for two
    small shapes.
    """
    cells = list(POSITIONS)
    pairs = []
    for a in cells:
        for b in cells:
            distance = max(abs(a[0] - b[0]), abs(a[1] - b[1]))
            if distance == 2 or (distance == 1 and both_small):
                pairs.append((a, b))
    return pairs


def random_scene(rng: np.random.Generator, n_shapes: int) -> dict:
    """A scene of ``n_shapes`` (1 or 2) random shapes of the seen combinations (never :data:`HELD_OUT`);
    two shapes differ in colour or kind and never overlap."""
    cells = list(POSITIONS)
    kinds = list(SEEN_KINDS)
    first = kinds[rng.integers(len(kinds))]
    if n_shapes == 1:
        shapes = [_random_shape(rng, *first, cells[rng.integers(len(cells))])]
    else:
        second_kinds = [k for k in kinds if k != first]  # a different colour or shape
        second = second_kinds[rng.integers(len(second_kinds))]
        sizes = [str(rng.choice(list(SIZES))) for _ in range(2)]
        pairs = _cell_pairs(both_small=sizes == ["small", "small"])
        cell1, cell2 = pairs[rng.integers(len(pairs))]
        shapes = [_random_shape(rng, *first, cell1, sizes[0]), _random_shape(rng, *second, cell2, sizes[1])]
    return {"background": _random_background(rng), "shapes": shapes}


def class_scene(rng: np.random.Generator, colour: str, shape: str) -> dict:
    """A zero-shot image's scene: one shape of the given colour and kind at a random grid cell."""
    cells = list(POSITIONS)
    cell = cells[rng.integers(len(cells))]
    return {"background": _random_background(rng), "shapes": [_random_shape(rng, colour, shape, cell)]}


# --------------------------------------------------------------------------- rendering


def _unit_polygon(kind: str) -> list[tuple[float, float]] | None:
    """Vertices of a shape of area pi (a unit circle's), centred on its centroid; None for the circle."""
    if kind == "circle":
        return None
    if kind == "square":
        points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "diamond":
        points = [(0, -1), (0.8, 0), (0, 1), (-0.8, 0)]
    elif kind == "triangle":
        points = [(0, -1), (0.866, 0.5), (-0.866, 0.5)]
    else:  # cross: a plus sign, arms 0.8 wide
        w = 0.4
        points = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    area = 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))
    scale = math.sqrt(math.pi / area)
    return [(x * scale, y * scale) for x, y in points]


def shape_extent(kind: str) -> float:
    """Farthest point of a shape of radius 1 (equal-area), from its centre."""
    points = _unit_polygon(kind)
    return 1.0 if points is None else max(math.hypot(x, y) for x, y in points)


def _polygon(shape: dict, side: float) -> list[tuple[float, float]] | None:
    points = _unit_polygon(shape["shape"])
    if points is None:
        return None
    cx, cy, r = shape["cx"] * side, shape["cy"] * side, shape["radius"] * side
    angle = math.radians(shape["angle"])
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def render_scene(scene: dict, image_size: int) -> Image.Image:
    """Draw a scene (as stored in scenes.json) as an RGB image of side ``image_size``.

    Each shape's coverage mask is drawn ``SUPERSAMPLE`` times larger and box-
    filtered down (anti-aliased edges), then blended over the background.
    """
    bg = scene["background"]
    ys, xs = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1) - 0.5
    ramp = xs * math.cos(bg["gradient_angle"]) + ys * math.sin(bg["gradient_angle"])
    pixels = np.array(bg["rgb"], dtype=np.float64)[None, None, :] + bg["gradient"] * ramp[..., None]
    big = image_size * SUPERSAMPLE
    for shape in scene["shapes"]:
        mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(mask)
        points = _polygon(shape, big)
        if points is None:
            cx, cy, r = shape["cx"] * big, shape["cy"] * big, shape["radius"] * big
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(points, fill=255)
        coverage = mask.resize((image_size, image_size), Image.Resampling.BOX)
        alpha = np.asarray(coverage, dtype=np.float64)[..., None] / 255
        pixels = pixels * (1 - alpha) + np.array(shape["rgb"], dtype=np.float64) * alpha
    noise = np.random.default_rng(bg["noise_seed"]).normal(0, bg["noise"], size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- captions


def _word(rng: np.random.Generator, words: list[str]) -> str:
    if len(words) == 1 or rng.random() < CANONICAL_WORD_P:
        return words[0]
    return words[1 + int(rng.integers(len(words) - 1))]


def _relation(a: dict, b: dict) -> str:
    if a["row"] != b["row"]:
        return "above" if a["row"] < b["row"] else "below"
    return "left of" if a["col"] < b["col"] else "right of"


def _fields(rng: np.random.Generator, scene: dict) -> dict[str, str]:
    fields = {"bg": _word(rng, TONES[scene["background"]["tone"]])}
    shapes = scene["shapes"]
    for k, shape in enumerate(shapes, start=1):
        suffix = "" if len(shapes) == 1 else str(k)
        fields["c" + suffix] = _word(rng, COLOURS[shape["colour"]][1])
        fields["s" + suffix] = _word(rng, SHAPES[shape["shape"]])
        fields["z" + suffix] = _word(rng, SIZES[shape["size"]])
        fields["p" + suffix] = _word(rng, POSITIONS[(shape["row"], shape["col"])])
    if len(shapes) == 2:
        fields["rel"] = _word(rng, RELATIONS[_relation(*shapes)])
    return fields


def _articles(text: str) -> str:
    """ "a" before a vowel becomes "an" (the templates say "a {c} {s}")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def captions_for(rng: np.random.Generator, scene: dict, n: int) -> list[str]:
    """``n`` different captions of a scene, each from a different template."""
    templates = SINGLE_TEMPLATES if len(scene["shapes"]) == 1 else PAIR_TEMPLATES
    order = rng.permutation(len(templates))[:n]
    captions = [_articles(templates[t].format(**_fields(rng, scene))) for t in order]
    if len(set(captions)) != len(captions):  # templates differ in wording, so this cannot happen
        raise AssertionError(f"duplicate captions generated: {captions}")
    return captions
