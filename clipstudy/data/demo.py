"""The embedded demo benchmark: synthetic shapes with captions, in the study's formats.

``python -m clipstudy make-demo-data --out DIR`` writes a small image-text data
set that exercises the whole pipeline on a CPU in minutes::

    DIR/train.json            [{"image": "train/000000.png", "caption": str, "image_id": int}, ...]
    DIR/images/train/...      (image root of every split: DIR/images)
    DIR/retrieval.json        test: [{"image": "retrieval/000000.png", "caption": [5 different strs]}, ...]
    DIR/val_retrieval.json    validation, drawn like the test set from its own random stream
    DIR/images/retrieval/... and DIR/images/val_retrieval/...
    DIR/zeroshot/<class_id>/NNN.png and DIR/zeroshot/classnames.json          (test)
    DIR/val_zeroshot/<class_id>/NNN.png and DIR/val_zeroshot/classnames.json  (validation)
    DIR/tokenizer/            a Hugging Face fast WordPiece tokenizer of the training captions
    DIR/scenes.json           what each image shows (ground truth, for analysis and tests)
    DIR/manifest.json         parameters, counts, overlap counts, chance levels, content digest (written last)

Each image shows one or two coloured shapes (7 colours x 5 shapes) at one of
nine grid positions (with jitter), small or large, on a dark or light
background with a gradient and pixel noise. Captions come from several
templates and synonyms, and some mention only colour and shape, so retrieval
needs position and size while no caption set pins every image down.

The zero-shot test is compositional: its classes are 15 colour x shape
combinations (``demo_scenes.HELD_OUT``) that no training image or caption, no
retrieval image and nothing the towers are pretrained on ever shows, while
every colour and every shape appears with other partners. Naming "a red
circle" then measures transfer, not memory of the label space. The manifest
counts the zero-shot scenes that share a combination with a training scene
(0, checked on every generation).

Generation is deterministic: the same parameters give byte-identical files.

This module writes the files, the tokenizer and the manifest and holds the
command line; the scenes, their rendering and the caption grammar are in
:mod:`clipstudy.data.demo_scenes`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# the scene vocabulary, sampling, rendering and captions; re-exported, as they were defined here before
from clipstudy.arguments import CommandParser
from clipstudy.data.demo_scenes import (  # noqa: F401
    COLOURS,
    PAIR_P,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    TONES,
    ZEROSHOT_TEMPLATES,
    captions_for,
    class_ids,
    class_scene,
    overlap_counts,
    random_scene,
    render_scene,
    shape_extent,
)
from clipstudy.data.tokenizer import build_tokenizer
from clipstudy.errors import StartupError

# 2: compositional zero-shot classes (demo_scenes.HELD_OUT), validation sets, larger evaluation sets,
#    the tokenizer from the training captions only
GENERATOR_VERSION = 2

CAPTIONS_PER_RETRIEVAL_IMAGE = 5

# Evaluation sets large enough to separate cells: 1000 retrieval images (5000 captions) and
# 15 x 140 = 2100 zero-shot images give a binomial standard error of about 1 point for the zero-shot
# accuracy and under 1 point for the Average; the validation sets are as large as the test sets.
DEFAULTS = dict(
    seed=0, image_size=32, train_size=4000, retrieval_size=1000, zeroshot_per_class=140, zeroshot_classes=None
)


# --------------------------------------------------------------------------- files


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)  # fixed settings, no metadata


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


_OUTPUTS = (
    "train.json",
    "retrieval.json",
    "val_retrieval.json",
    "scenes.json",
    "images",
    "zeroshot",
    "val_zeroshot",
    "tokenizer",
)


def content_digest(out: str | Path) -> tuple[str, int]:
    """SHA-256 over every generated file (path and bytes) except the manifest, and the file count."""
    out = Path(out)
    files = sorted(
        p
        for name in _OUTPUTS
        for p in ([out / name] if (out / name).is_file() else (out / name).rglob("*"))
        if p.is_file()
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(out).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), len(files)


def _parameters(
    seed: int,
    image_size: int,
    train_size: int,
    retrieval_size: int,
    zeroshot_per_class: int,
    zeroshot_classes: int | None,
) -> dict:
    n_classes = len(class_ids())
    checks = {
        "image_size": (image_size, 8),
        "train_size": (train_size, 1),
        "retrieval_size": (retrieval_size, 1),
        "zeroshot_per_class": (zeroshot_per_class, 1),
    }
    for name, (value, low) in checks.items():
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_demo_data: {name} must be an integer >= {low}, got {value!r}")
    if zeroshot_classes is not None and not 2 <= zeroshot_classes <= n_classes:
        raise ValueError(f"make_demo_data: zeroshot_classes must be between 2 and {n_classes}, got {zeroshot_classes}")
    return {
        "seed": int(seed),
        "image_size": image_size,
        "train_size": train_size,
        "retrieval_size": retrieval_size,
        "zeroshot_per_class": zeroshot_per_class,
        "zeroshot_classes": zeroshot_classes or n_classes,
    }


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
    raise DifferentDataSet(
        f"{out} holds another data set ({held}), not the one asked for ({asked}); runs trained "
        "on it would lose their data: pass --force to replace it, or choose another --out"
    )


def _settings(parameters: dict, keys=None) -> str:
    return ", ".join(f"{k}={parameters.get(k)}" for k in (keys or parameters))


def _chosen_classes(n: int) -> list[str]:
    ids = class_ids()
    # evenly spread over the sorted ids, so a small subset mixes colours and shapes
    return [ids[math.floor(k * len(ids) / n)] for k in range(n)]


def make_demo_data(
    out: str | Path,
    *,
    seed: int = DEFAULTS["seed"],
    image_size: int = DEFAULTS["image_size"],
    train_size: int = DEFAULTS["train_size"],
    retrieval_size: int = DEFAULTS["retrieval_size"],
    zeroshot_per_class: int = DEFAULTS["zeroshot_per_class"],
    zeroshot_classes: int | None = DEFAULTS["zeroshot_classes"],
    force: bool = False,
) -> dict:
    """Generate the demo benchmark in ``out`` (layout in the module docstring); returns the manifest.

    Args:
        seed: random seed (default 0); the same parameters give byte-identical files.
        image_size: image side in pixels (default 32).
        train_size: training pairs (default 4000).
        retrieval_size: retrieval images, 5 captions each, in each of the test and validation sets (default 1000).
        zeroshot_per_class: zero-shot images per class in each set (default 140).
        zeroshot_classes: number of held-out colour x shape classes (default None = all 15).
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
    _remove_outputs(out)
    out.mkdir(parents=True, exist_ok=True)

    # independent streams, so changing one set's size leaves the others unchanged; the validation
    # sets are drawn exactly like the test sets, from their own streams
    train_rng, *evaluation_rngs = map(np.random.default_rng, np.random.SeedSequence(seed).spawn(5))
    train_scenes, train_captions = _captioned_images(train_rng, "train", train_size, 1, out, image_size)
    train = [
        {"image": scene["image"], "caption": captions[0], "image_id": i}
        for i, (scene, captions) in enumerate(zip(train_scenes, train_captions))
    ]
    classes = _chosen_classes(parameters["zeroshot_classes"])
    scenes = {"train": train_scenes}
    retrieval = {}
    for prefix, (retrieval_rng, zeroshot_rng) in (("", evaluation_rngs[:2]), ("val_", evaluation_rngs[2:])):
        retrieval[prefix], scenes[f"{prefix}retrieval"], scenes[f"{prefix}zeroshot"] = _evaluation_split(
            out, prefix, retrieval_rng, zeroshot_rng, parameters, classes
        )
    _write_json(out / "train.json", train)
    _write_json(out / "scenes.json", scenes)

    # the tokenizer knows the training captions only; evaluation words it never saw (a prompt's
    # "photo", a retrieval caption's rare synonym) are split into its character pieces
    tokenizer = build_tokenizer([e["caption"] for e in train])
    tokenizer.save_pretrained(str(out / "tokenizer"))
    manifest = _manifest(out, parameters, classes, retrieval[""], scenes, len(tokenizer))
    _write_json(out / "manifest.json", manifest)  # last: its presence marks a complete set
    return manifest


def _evaluation_split(out: Path, prefix: str, retrieval_rng, zeroshot_rng, parameters: dict, classes: list[str]):
    """Write one evaluation split (``prefix`` "" = test, "val_" = validation): its retrieval set and its
    zero-shot folder; returns (retrieval entries, retrieval scenes, zero-shot scenes)."""
    image_size = parameters["image_size"]
    retrieval_scenes, retrieval_captions = _captioned_images(
        retrieval_rng,
        f"{prefix}retrieval",
        parameters["retrieval_size"],
        CAPTIONS_PER_RETRIEVAL_IMAGE,
        out,
        image_size,
    )
    retrieval = [{"image": s["image"], "caption": c} for s, c in zip(retrieval_scenes, retrieval_captions)]
    _write_json(out / f"{prefix}retrieval.json", retrieval)
    folder = out / f"{prefix}zeroshot"
    zeroshot_scenes = write_zeroshot_folder(zeroshot_rng, classes, parameters["zeroshot_per_class"], folder, image_size)
    return retrieval, retrieval_scenes, zeroshot_scenes


def _manifest(out: Path, parameters: dict, classes: list[str], test_retrieval: list, scenes: dict, vocab: int) -> dict:
    """The manifest: parameters, counts, the counted overlap of the zero-shot scenes with training, chance
    levels and the content digest (refuses a set whose zero-shot classes leaked into training)."""
    n_texts = sum(len(e["caption"]) for e in test_retrieval)
    n_classes = len(classes)
    digest, n_files = content_digest(out)
    overlap = {split: overlap_counts(scenes[split], scenes["train"]) for split in ("zeroshot", "val_zeroshot")}
    for split, counts in overlap.items():
        if any(counts.values()):  # the generator leaked the held-out label space: never ship such a set
            raise AssertionError(f"{split} scenes overlap the training scenes: {counts}")
    per_split = parameters["zeroshot_per_class"] * n_classes
    return {
        "generator": "clipstudy.data.demo",
        "generator_version": GENERATOR_VERSION,
        "parameters": parameters,
        "counts": {
            "train_pairs": parameters["train_size"],
            "retrieval_images": parameters["retrieval_size"],
            "retrieval_texts": n_texts,
            "zeroshot_classes": n_classes,
            "zeroshot_images": per_split,
            "val_retrieval_images": parameters["retrieval_size"],
            "val_zeroshot_images": per_split,
            "tokenizer_vocab": vocab,
            "files": n_files,
        },
        "held_out_classes": sorted(classes),
        # zero-shot scenes sharing a colour x shape combination (or a whole configuration) with a
        # training scene: 0 by construction, counted here (the towers' pretraining counts its own)
        "zeroshot_overlap_with_train": overlap,
        "chance": _chance_levels(test_retrieval, n_texts, n_classes),
        "digest": digest,
    }


def _remove_outputs(out: Path) -> None:
    """Delete what this generator writes in ``out`` (and only that)."""
    for name in ("manifest.json",) + _OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _captioned_images(
    rng: np.random.Generator, split: str, count: int, n_captions: int, out: Path, image_size: int
) -> tuple[list[dict], list[list[str]]]:
    """Draw, render and caption ``count`` scenes of one split; returns the scenes and each one's captions."""
    scenes, captions = [], []
    for i in range(count):
        scene = random_scene(rng, 2 if rng.random() < PAIR_P else 1)
        scene["image"] = f"{split}/{i:06d}.png"
        _save_png(render_scene(scene, image_size), out / "images" / scene["image"])
        captions.append(captions_for(rng, scene, n_captions))
        scenes.append(scene)
    return scenes, captions


def write_zeroshot_folder(
    rng: np.random.Generator, classes: list[str], per_class: int, folder: Path, image_size: int
) -> list[dict]:
    """A zero-shot ImageFolder: ``per_class`` one-shape scenes of each colour x shape class id (``colour_shape``)
    drawn from ``rng`` and rendered, and ``classnames.json`` with the demo's prompts; returns the scenes."""
    scenes = []
    for class_id in classes:
        colour, shape = class_id.split("_")
        for k in range(per_class):
            scene = class_scene(rng, colour, shape)
            scene["image"] = f"{class_id}/{k:03d}.png"
            scene["label"] = class_id
            _save_png(render_scene(scene, image_size), folder / scene["image"])
            scenes.append(scene)
    classnames = {class_id: class_id.replace("_", " ") for class_id in classes}
    _write_json(folder / "classnames.json", {"classnames": classnames, "templates": ZEROSHOT_TEMPLATES})
    return scenes


def _chance_levels(retrieval: list[dict], n_texts: int, n_classes: int) -> dict[str, float]:
    """Expected metrics (in %) of a model that ranks at random."""
    chance = {
        # an image is a text-retrieval hit if any of its captions ranks first
        "txt_r1": 100.0 * float(np.mean([len(e["caption"]) / n_texts for e in retrieval])),
        "img_r1": 100.0 / len(retrieval),
        "zeroshot_top1": 100.0 / n_classes,
        "zeroshot_top5": 100.0 * min(5, n_classes) / n_classes,
    }
    chance["average"] = (chance["txt_r1"] + chance["img_r1"] + chance["zeroshot_top1"]) / 3
    return chance


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="python -m clipstudy make-demo-data", description="Generate the embedded synthetic image-text benchmark."
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=DEFAULTS["image_size"], help="image side (default 32)")
    parser.add_argument("--train-size", type=int, default=DEFAULTS["train_size"], help="training pairs (default 4000)")
    parser.add_argument(
        "--retrieval-size",
        type=int,
        default=DEFAULTS["retrieval_size"],
        help="retrieval images, 5 captions each, in the test and the validation set "
        f"(default {DEFAULTS['retrieval_size']})",
    )
    parser.add_argument(
        "--zeroshot-per-class",
        type=int,
        default=DEFAULTS["zeroshot_per_class"],
        help=f"zero-shot images per class, in each of the two sets (default {DEFAULTS['zeroshot_per_class']})",
    )
    parser.add_argument(
        "--zeroshot-classes",
        type=int,
        default=None,
        help=f"number of held-out colour x shape classes (default all {len(class_ids())})",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="regenerate even if DIR holds the same set, and replace a different set in DIR",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    kwargs = dict(
        seed=args.seed,
        image_size=args.image_size,
        train_size=args.train_size,
        retrieval_size=args.retrieval_size,
        zeroshot_per_class=args.zeroshot_per_class,
        zeroshot_classes=args.zeroshot_classes,
    )
    try:
        parameters = _parameters(**kwargs)
        if not args.force:
            if existing_manifest(args.out, parameters) is not None:
                print(
                    f"{args.out}: demo data set already complete with these parameters; not regenerating "
                    "(use --force to rebuild)"
                )
                return 0
            refuse_to_replace(args.out, parameters)
    except ValueError as error:  # a bad parameter, or DifferentDataSet
        raise StartupError(f"make-demo-data: {error}") from None
    start = time.perf_counter()
    manifest = make_demo_data(args.out, force=True, **kwargs)
    counts, chance = manifest["counts"], manifest["chance"]
    print(
        f"wrote {args.out} in {time.perf_counter() - start:.1f} s: {counts['train_pairs']} train pairs, "
        f"{counts['retrieval_images']} retrieval images x 5 captions, {counts['zeroshot_classes']} zero-shot "
        f"classes x {parameters['zeroshot_per_class']} images, tokenizer vocabulary {counts['tokenizer_vocab']}"
    )
    print(
        f"chance: TR@1 {chance['txt_r1']:.2f}%, IR@1 {chance['img_r1']:.2f}%, "
        f"zero-shot top-1 {chance['zeroshot_top1']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
