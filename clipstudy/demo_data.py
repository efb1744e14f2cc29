"""The embedded demo benchmark: synthetic shapes with captions, in the study's formats.

``python -m clipstudy make-demo-data --out DIR`` writes a small image-text data
set that exercises the whole pipeline on a CPU in minutes::

    DIR/train.json            [{"image": "train/000000.png", "caption": str, "image_id": int}, ...]
    DIR/images/train/...      (image root of train and retrieval: DIR/images)
    DIR/retrieval.json        [{"image": "retrieval/000000.png", "caption": [5 different strs]}, ...]
    DIR/images/retrieval/...
    DIR/zeroshot/<class_id>/NNN.png and DIR/zeroshot/classnames.json
    DIR/tokenizer/            a Hugging Face fast WordPiece tokenizer for the captions
    DIR/scenes.json           what each image shows (ground truth, for analysis and tests)
    DIR/manifest.json         parameters, counts, chance levels, content digest (written last)

Each image shows one or two coloured shapes (7 colours x 5 shapes) at one of
nine grid positions (with jitter), small or large, on a dark or light
background with a gradient and pixel noise. Captions come from several
templates and synonyms, and some mention only colour and shape, so retrieval
needs position and size while no caption set pins every image down. Zero-shot
classes are the 35 colour x shape pairs ("red circle"), balanced.

Generation is deterministic: the same parameters give byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from clipstudy.errors import StartupError

GENERATOR_VERSION = 1

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
    "above": ["above", "over"], "below": ["below", "under"],
    "left of": ["to the left of", "left of"], "right of": ["to the right of", "right of"],
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
    "a photo of a {}.", "a {} on a plain background.", "a drawing of a {}.", "a picture of a {}.",
    "a small {}.", "a large {}.", "a {} in the picture.", "an image showing a {}.",
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0
CANONICAL_WORD_P = 0.5      # probability a caption uses the canonical word, else a synonym
PAIR_P = 0.4                # share of two-shape images in train and retrieval
SUPERSAMPLE = 4             # shapes are drawn this many times larger, then downsampled (anti-aliasing)
CELL_CENTRES = (0.22, 0.5, 0.78)  # grid cell centres as fractions of the side
JITTER = 0.06
# Every shape has the area of a circle of this radius (fraction of the side),
# so "small" and "large" mean the same area for every shape: small covers
# at most 3.8 % of the image, large at least 7.1 %.
RADIUS = {"small": (0.085, 0.11), "large": (0.15, 0.18)}
CAPTIONS_PER_RETRIEVAL_IMAGE = 5

DEFAULTS = dict(seed=0, image_size=32, train_size=4000, retrieval_size=500, zeroshot_per_class=10,
                zeroshot_classes=None)


def class_ids() -> list[str]:
    """All zero-shot class ids (``colour_shape``), sorted = class index order."""
    return sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)


def demo_paths(data_dir: str | Path) -> dict[str, Path]:
    """The demo layout's paths (keys as in the check-data / train options)."""
    data_dir = Path(data_dir)
    return {"train_ann": data_dir / "train.json", "train_images": data_dir / "images",
            "retrieval_ann": data_dir / "retrieval.json", "retrieval_images": data_dir / "images",
            "zeroshot_images": data_dir / "zeroshot", "tokenizer": data_dir / "tokenizer",
            "manifest": data_dir / "manifest.json", "scenes": data_dir / "scenes.json"}


# --------------------------------------------------------------------------- scenes

def _cell_centre(rng: np.random.Generator, cell: tuple[int, int], extent: float) -> tuple[float, float]:
    row, col = cell
    # clamp so the shape stays inside the image
    low, high = extent + 0.02, 1 - extent - 0.02
    cx = float(np.clip(CELL_CENTRES[col] + rng.uniform(-JITTER, JITTER), low, high))
    cy = float(np.clip(CELL_CENTRES[row] + rng.uniform(-JITTER, JITTER), low, high))
    return round(cx, 4), round(cy, 4)


def _random_shape(rng: np.random.Generator, colour: str, shape: str, cell: tuple[int, int],
                  size: str | None = None) -> dict:
    size = size or str(rng.choice(list(SIZES)))
    radius = round(float(rng.uniform(*RADIUS[size])), 4)
    cx, cy = _cell_centre(rng, cell, radius * shape_extent(shape))
    base = np.array(COLOURS[colour][0])
    rgb = np.clip(base + rng.integers(-18, 19, size=3), 0, 255)
    return {"colour": colour, "shape": shape, "size": size, "row": cell[0], "col": cell[1],
            "cx": cx, "cy": cy, "radius": radius, "rgb": [int(v) for v in rgb],
            "angle": round(float(rng.uniform(-12, 12)), 2)}


def _random_background(rng: np.random.Generator) -> dict:
    tone = str(rng.choice(list(TONES)))
    level = rng.uniform(25, 85) if tone == "dark" else rng.uniform(160, 220)
    rgb = np.clip(level + rng.integers(-12, 13, size=3), 0, 255)
    return {"tone": tone, "rgb": [int(v) for v in rgb],
            "gradient": round(float(rng.uniform(-25, 25)), 2),
            "gradient_angle": round(float(rng.uniform(0, 2 * math.pi)), 4),
            "noise": round(float(rng.uniform(3, 8)), 2), "noise_seed": int(rng.integers(2**31))}


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


def _random_scene(rng: np.random.Generator, n_shapes: int) -> dict:
    cells = list(POSITIONS)
    kinds = [(c, s) for c in COLOURS for s in SHAPES]
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
        points = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                  (-1, -w), (-w, -w)]
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
    """"a" before a vowel becomes "an" (the templates say "a {c} {s}")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def captions_for(rng: np.random.Generator, scene: dict, n: int) -> list[str]:
    """``n`` different captions of a scene, each from a different template."""
    templates = SINGLE_TEMPLATES if len(scene["shapes"]) == 1 else PAIR_TEMPLATES
    order = rng.permutation(len(templates))[:n]
    captions = [_articles(templates[t].format(**_fields(rng, scene))) for t in order]
    if len(set(captions)) != len(captions):  # templates differ in wording, so this cannot happen
        raise AssertionError(f"duplicate captions generated: {captions}")
    return captions


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer(texts: list[str]):
    """A BERT-style WordPiece fast tokenizer whose vocabulary covers ``texts``.

    Pipeline (``tokenizers`` library): BertNormalizer (lower case),
    BertPreTokenizer, WordPiece, "[CLS] $A [SEP]"; special tokens [PAD]=0,
    [UNK], [CLS], [SEP], [MASK]. The vocabulary is every character (and its
    "##" continuation) and every whole word of the corpus, words by
    descending count then alphabetically.

    Why not ``WordPieceTrainer``: its merge order breaks ties through a hash
    map, so the vocabulary changes from one process to the next; the demo
    data set must be byte-identical for a seed. With a vocabulary this small,
    keeping whole words is also what the trainer would converge to.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import DistilBertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789").union(*words))
    vocab_list = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    seen = set(vocab_list)
    vocab_list += [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])) if w not in seen]
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece()
    return DistilBertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=64)


# --------------------------------------------------------------------------- files

def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)  # fixed settings, no metadata


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


_OUTPUTS = ("train.json", "retrieval.json", "scenes.json", "images", "zeroshot", "tokenizer")


def content_digest(out: str | Path) -> tuple[str, int]:
    """SHA-256 over every generated file (path and bytes) except the manifest, and the file count."""
    out = Path(out)
    files = sorted(p for name in _OUTPUTS for p in ([out / name] if (out / name).is_file()
                                                    else (out / name).rglob("*")) if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(out).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), len(files)


def _parameters(seed: int, image_size: int, train_size: int, retrieval_size: int,
                zeroshot_per_class: int, zeroshot_classes: int | None) -> dict:
    n_classes = len(class_ids())
    checks = {"image_size": (image_size, 8), "train_size": (train_size, 1), "retrieval_size": (retrieval_size, 1),
              "zeroshot_per_class": (zeroshot_per_class, 1)}
    for name, (value, low) in checks.items():
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_demo_data: {name} must be an integer >= {low}, got {value!r}")
    if zeroshot_classes is not None and not 2 <= zeroshot_classes <= n_classes:
        raise ValueError(f"make_demo_data: zeroshot_classes must be between 2 and {n_classes}, got {zeroshot_classes}")
    return {"seed": int(seed), "image_size": image_size, "train_size": train_size,
            "retrieval_size": retrieval_size, "zeroshot_per_class": zeroshot_per_class,
            "zeroshot_classes": zeroshot_classes or n_classes}


def existing_manifest(out: str | Path, parameters: dict) -> dict | None:
    """The manifest of a complete, unmodified set in ``out`` made with ``parameters``, else None."""
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("parameters") != parameters:
        return None
    if (manifest.get("digest"), manifest.get("counts", {}).get("files")) != content_digest(out):
        return None
    return manifest


class DifferentDataSet(ValueError):
    """The output folder holds another data set; it is replaced only with ``force``."""


def refuse_to_replace(out: str | Path, parameters: dict) -> None:
    """Raise :class:`DifferentDataSet` when ``out`` holds files of a set other than ``parameters`` asks for.

    A set made with the same parameters (complete or damaged) is not different:
    rebuilding it gives the same bytes. Anything else (other parameters, another
    generator version, files without a manifest) would silently change what
    finished runs were trained on.
    """
    out = Path(out)
    if not any((out / name).exists() for name in ("manifest.json",) + _OUTPUTS):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        held, asked = "files but no readable manifest.json: an interrupted or foreign set", _settings(parameters)
    elif manifest.get("generator_version") != GENERATOR_VERSION:
        held = f"generator version {manifest.get('generator_version')}"
        asked = f"version {GENERATOR_VERSION}"
    elif manifest.get("parameters") != parameters:
        old = manifest.get("parameters") or {}
        keys = [k for k in parameters if old.get(k) != parameters[k]]
        held, asked = _settings(old, keys), _settings(parameters, keys)
    else:
        return
    raise DifferentDataSet(f"{out} holds another data set ({held}), not the one asked for ({asked}); runs trained "
                           "on it would lose their data: pass --force to replace it, or choose another --out")


def _settings(parameters: dict, keys=None) -> str:
    return ", ".join(f"{k}={parameters.get(k)}" for k in (keys or parameters))


def _chosen_classes(n: int) -> list[str]:
    ids = class_ids()
    # evenly spread over the sorted ids, so a small subset mixes colours and shapes
    return [ids[math.floor(k * len(ids) / n)] for k in range(n)]


def make_demo_data(out: str | Path, *, seed: int = 0, image_size: int = 32, train_size: int = 4000,
                   retrieval_size: int = 500, zeroshot_per_class: int = 10, zeroshot_classes: int | None = None,
                   force: bool = False) -> dict:
    """Generate the demo benchmark in ``out`` (layout in the module docstring); returns the manifest.

    Args:
        seed: random seed (default 0); the same parameters give byte-identical files.
        image_size: image side in pixels (default 32).
        train_size: training pairs (default 4000).
        retrieval_size: retrieval images, 5 captions each (default 500).
        zeroshot_per_class: zero-shot images per class (default 10).
        zeroshot_classes: number of colour x shape classes (default None = all 35).
        force: regenerate even when ``out`` already holds this exact set, and replace
            a different set (without it, :class:`DifferentDataSet` is raised).
    """
    out = Path(out)
    parameters = _parameters(seed, image_size, train_size, retrieval_size, zeroshot_per_class, zeroshot_classes)
    if not force:
        manifest = existing_manifest(out, parameters)
        if manifest is not None:
            return manifest
        refuse_to_replace(out, parameters)
    for name in ("manifest.json",) + _OUTPUTS:  # only what this generator writes
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)

    # independent streams, so changing one set's size leaves the others unchanged
    train_rng, retrieval_rng, zeroshot_rng = (np.random.default_rng(s)
                                              for s in np.random.SeedSequence(seed).spawn(3))
    scenes: dict[str, list[dict]] = {"train": [], "retrieval": [], "zeroshot": []}

    train = []
    for i in range(train_size):
        scene = _random_scene(train_rng, 2 if train_rng.random() < PAIR_P else 1)
        scene["image"] = f"train/{i:06d}.png"
        _save_png(render_scene(scene, image_size), out / "images" / scene["image"])
        train.append({"image": scene["image"], "caption": captions_for(train_rng, scene, 1)[0], "image_id": i})
        scenes["train"].append(scene)

    retrieval = []
    for i in range(retrieval_size):
        scene = _random_scene(retrieval_rng, 2 if retrieval_rng.random() < PAIR_P else 1)
        scene["image"] = f"retrieval/{i:06d}.png"
        _save_png(render_scene(scene, image_size), out / "images" / scene["image"])
        retrieval.append({"image": scene["image"],
                          "caption": captions_for(retrieval_rng, scene, CAPTIONS_PER_RETRIEVAL_IMAGE)})
        scenes["retrieval"].append(scene)

    classes = _chosen_classes(parameters["zeroshot_classes"])
    cells = list(POSITIONS)
    for class_id in classes:
        colour, shape = class_id.split("_")
        for k in range(zeroshot_per_class):
            cell = cells[zeroshot_rng.integers(len(cells))]
            scene = {"background": _random_background(zeroshot_rng),
                     "shapes": [_random_shape(zeroshot_rng, colour, shape, cell)],
                     "image": f"{class_id}/{k:03d}.png", "label": class_id}
            _save_png(render_scene(scene, image_size), out / "zeroshot" / scene["image"])
            scenes["zeroshot"].append(scene)
    classnames = {class_id: class_id.replace("_", " ") for class_id in classes}
    _write_json(out / "zeroshot" / "classnames.json", {"classnames": classnames, "templates": ZEROSHOT_TEMPLATES})

    _write_json(out / "train.json", train)
    _write_json(out / "retrieval.json", retrieval)
    _write_json(out / "scenes.json", scenes)

    prompts = [t.format(name) for name in classnames.values() for t in ZEROSHOT_TEMPLATES]
    texts = [e["caption"] for e in train] + [c for e in retrieval for c in e["caption"]] + prompts
    tokenizer = build_tokenizer(texts)
    tokenizer.save_pretrained(str(out / "tokenizer"))

    n_texts = sum(len(e["caption"]) for e in retrieval)
    n_classes = len(classes)
    chance = {
        # an image is a text-retrieval hit if any of its captions ranks first
        "txt_r1": 100.0 * float(np.mean([len(e["caption"]) / n_texts for e in retrieval])),
        "img_r1": 100.0 / retrieval_size,
        "zeroshot_top1": 100.0 / n_classes,
        "zeroshot_top5": 100.0 * min(5, n_classes) / n_classes,
    }
    chance["average"] = (chance["txt_r1"] + chance["img_r1"] + chance["zeroshot_top1"]) / 3
    digest, n_files = content_digest(out)
    manifest = {
        "generator": "clipstudy.demo_data", "generator_version": GENERATOR_VERSION,
        "parameters": parameters,
        "counts": {"train_pairs": train_size, "retrieval_images": retrieval_size, "retrieval_texts": n_texts,
                   "zeroshot_classes": n_classes, "zeroshot_images": n_classes * zeroshot_per_class,
                   "tokenizer_vocab": len(tokenizer), "files": n_files},
        "chance": chance,
        "digest": digest,
    }
    _write_json(out / "manifest.json", manifest)  # last: its presence marks a complete set
    return manifest


# --------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipstudy make-demo-data",
                                     description="Generate the embedded synthetic image-text benchmark.")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="image side (default 32)")
    parser.add_argument("--train-size", type=int, default=DEFAULTS["train_size"], help="training pairs (default 4000)")
    parser.add_argument("--retrieval-size", type=int, default=DEFAULTS["retrieval_size"],
                        help="retrieval images, 5 captions each (default 500)")
    parser.add_argument("--zeroshot-per-class", type=int, default=DEFAULTS["zeroshot_per_class"],
                        help="zero-shot images per class (default 10)")
    parser.add_argument("--zeroshot-classes", type=int, default=None,
                        help=f"number of colour x shape classes (default all {len(class_ids())})")
    parser.add_argument("--force", action="store_true",
                        help="regenerate even if DIR holds the same set, and replace a different set in DIR")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    kwargs = dict(seed=args.seed, image_size=args.image_size, train_size=args.train_size,
                  retrieval_size=args.retrieval_size, zeroshot_per_class=args.zeroshot_per_class,
                  zeroshot_classes=args.zeroshot_classes)
    try:
        parameters = _parameters(**kwargs)
        if not args.force:
            if existing_manifest(args.out, parameters) is not None:
                print(f"{args.out}: demo data set already complete with these parameters; not regenerating "
                      "(use --force to rebuild)")
                return 0
            refuse_to_replace(args.out, parameters)
    except ValueError as error:  # a bad parameter, or DifferentDataSet
        raise StartupError(f"make-demo-data: {error}") from None
    start = time.perf_counter()
    manifest = make_demo_data(args.out, force=True, **kwargs)
    counts, chance = manifest["counts"], manifest["chance"]
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {counts['train_pairs']} train pairs, "
          f"{counts['retrieval_images']} retrieval images x 5 captions, {counts['zeroshot_classes']} zero-shot "
          f"classes x {parameters['zeroshot_per_class']} images, tokenizer vocabulary {counts['tokenizer_vocab']}")
    print(f"chance: TR@1 {chance['txt_r1']:.2f}%, IR@1 {chance['img_r1']:.2f}%, "
          f"zero-shot top-1 {chance['zeroshot_top1']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
