"""``python -m clipstudy check-data``: validate data sets before training.

For each set given it counts the entries, decodes every image (progress bar on
stderr), lists unreadable files with the reason, and summarises the captions
(words after cleaning, with the count of captions that clean to nothing) or,
for zero-shot, the classes (with the empty class folders). For the training
set it also counts repeated ``image_id`` values, ids shared by different image
files, and repeated image-caption pairs (reported, not errors). Prints a
readable summary, or with ``--json`` exactly one JSON object on stdout.

Exit status: 0 when every given set has a readable image and at most
``--max-unreadable`` (a fraction, default 0.01) of its images unreadable; 1
when some set has no readable image or more unreadable ones than that (the
summary names the set and the threshold); 2 for a usage error or a malformed
set (:class:`~clipstudy.data.datasets.DataError`, message on stderr). When most of a
set's images are missing, the summary names the image root to check.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clipstudy.arguments import CommandParser
from clipstudy.data.layout import resolve_paths
from clipstudy.errors import StartupError

SETS = ("train", "retrieval", "zeroshot", "val_retrieval", "val_zeroshot")
PAIR_SETS = ("train", "retrieval", "val_retrieval")  # annotation file + image folder; the others are ImageFolders
DEFAULT_MAX_UNREADABLE = 0.01
MISSING_REASON = "file not found"  # clipstudy.data.images.UnreadableImage's reason for an absent file


def _try_open(path: str) -> str | None:
    """None if the image decodes, else the reason it does not."""
    from clipstudy.data.datasets import UnreadableImage, load_rgb_image  # torch: imported when checking, not for --help

    try:
        load_rgb_image(path)
    except UnreadableImage as error:
        return error.reason
    return None


def _open_all(paths: list[str], label: str, progress: bool, workers: int) -> list[dict]:
    """Decode every image; returns ``[{"path", "reason"}]`` for the unreadable ones, in input order."""
    from tqdm import tqdm

    # Pillow releases the GIL while decoding, so threads overlap the work.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(
            tqdm(
                pool.map(_try_open, paths),
                total=len(paths),
                desc=f"{label} images",
                unit="img",
                disable=not progress,
                file=sys.stderr,
            )
        )
    return [{"path": path, "reason": reason} for path, reason in zip(paths, reasons) if reason is not None]


def _word_summary(captions: Iterable[str], max_words: int) -> dict:
    from clipstudy.data.datasets import clean_caption

    counts = [len(clean_caption(c, max_words).split()) for c in captions]
    if not counts:
        return {"count": 0}
    return {
        "count": len(counts),
        "min_words": min(counts),
        "mean_words": round(statistics.fmean(counts), 2),
        "median_words": statistics.median(counts),
        "max_words": max(counts),
        "empty_after_cleaning": sum(1 for n in counts if n == 0),
    }


def _duplicates(entries: list[dict], examples: int = 5) -> dict:
    """Repeated ``image_id`` values and repeated pairs in a training annotation list.

    An id on several entries is normal when one image has several captions
    (CC3M-like data); an id shared by different image files, or the same
    image-caption pair written twice, is probably a mistake. All are only
    reported: training keys its per-sample state by entry, not by id.
    """
    images_by_id: dict = {}
    for entry in entries:
        if "image_id" in entry:
            images_by_id.setdefault(entry["image_id"], []).append(entry["image"])
    repeated = [image_id for image_id, images in images_by_id.items() if len(images) > 1]
    mixed = [image_id for image_id in repeated if len(set(images_by_id[image_id])) > 1]
    pairs = Counter((entry["image"], entry["caption"]) for entry in entries)
    return {
        "repeated_image_ids": len(repeated),
        "entries_with_repeated_ids": sum(len(images_by_id[i]) for i in repeated),
        "repeated_id_examples": repeated[:examples],
        "ids_on_different_images": len(mixed),
        "different_images_examples": mixed[:examples],
        "repeated_pairs": sum(n - 1 for n in pairs.values() if n > 1),
    }


def _check_pairs(kind: str, ann_file: str, image_root: str, max_words: int, progress: bool, workers: int) -> dict:
    from clipstudy.data.datasets import DataError, load_annotation_list

    entries = load_annotation_list(ann_file, "train" if kind == "train" else "retrieval")  # the format
    if not Path(image_root).is_dir():
        raise DataError(
            f"{image_root}: image root folder not found; pass the folder the image paths in {ann_file} are relative to"
        )
    paths = [str(Path(image_root) / entry["image"]) for entry in entries]
    unreadable = _open_all(paths, kind, progress, workers)
    section = {
        "ann_file": str(ann_file),
        "image_root": str(image_root),
        "entries": len(entries),
        "readable_images": len(paths) - len(unreadable),
        "unreadable_files": unreadable,
    }
    if kind == "train":
        section["captions"] = _word_summary((e["caption"] for e in entries), max_words)
        section["duplicates"] = _duplicates(entries)
    else:
        per_image = [1 if isinstance(e["caption"], str) else len(e["caption"]) for e in entries]
        section["texts"] = sum(per_image)
        section["captions_per_image"] = (
            {"min": min(per_image), "mean": round(statistics.fmean(per_image), 2), "max": max(per_image)}
            if per_image
            else {}
        )
        section["captions"] = _word_summary(
            (c for e in entries for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"])), max_words
        )
    section["usable"] = section["readable_images"] > 0
    missing = sum(1 for item in unreadable if item["reason"] == MISSING_REASON)
    if entries and missing > len(entries) / 2:
        section["hint"] = (
            f"{missing} of {len(entries)} images are missing: check the image root {image_root} "
            f"(the image paths in {ann_file} are relative to it)"
        )
    return section


def _check_zeroshot(root: str, progress: bool, workers: int) -> dict:
    from clipstudy.data.zeroshot import scan_image_folder

    classes, _, samples = scan_image_folder(root)
    per_class = {name: 0 for name in classes}
    for _, label in samples:
        per_class[classes[label]] += 1
    unreadable = _open_all([path for path, _ in samples], "zeroshot", progress, workers)
    has_names_file = (Path(root) / "classnames.json").is_file()
    return {
        "root": str(root),
        "classes": len(classes),
        "images": len(samples),
        "readable_images": len(samples) - len(unreadable),
        "images_per_class": {"min": min(per_class.values()), "max": max(per_class.values())},
        "empty_classes": [name for name, n in per_class.items() if n == 0],
        "classnames_file": has_names_file,
        "unreadable_files": unreadable,
        "usable": len(samples) > len(unreadable),
    }


def check_data(
    *,
    train_ann: str | None = None,
    train_images: str | None = None,
    retrieval_ann: str | None = None,
    retrieval_images: str | None = None,
    zeroshot_images: str | None = None,
    val_retrieval_ann: str | None = None,
    val_retrieval_images: str | None = None,
    val_zeroshot_images: str | None = None,
    data: str | None = None,
    max_words: int = 30,
    progress: bool = False,
    workers: int | None = None,
    max_unreadable: float = DEFAULT_MAX_UNREADABLE,
) -> dict:
    """Check the given sets; returns ``{"train": {...}, "retrieval": {...}, "zeroshot": {...},
    "val_retrieval": {...}, "val_zeroshot": {...}, "ok": bool}``.

    ``data`` is the data-folder layout shorthand (:mod:`clipstudy.data.layout`: ``train.json``,
    ``images``, ``retrieval.json``, ``zeroshot``, ``val_retrieval.json``, ``val_zeroshot``);
    explicit paths win. Only sets
    with paths appear in the result. ``ok`` is False when some set has no
    usable entry, or more than ``max_unreadable`` (a fraction) of its images
    unreadable (its ``over_threshold``). ``workers`` threads decode images
    (default: CPU count).

    Raises:
        DataError: a malformed annotation file or missing folder.
        ValueError: an annotation file without its image folder (or the
            reverse), or no set at all.
    """
    paths = dict(
        train_ann=train_ann,
        train_images=train_images,
        retrieval_ann=retrieval_ann,
        retrieval_images=retrieval_images,
        zeroshot_images=zeroshot_images,
        val_retrieval_ann=val_retrieval_ann,
        val_retrieval_images=val_retrieval_images,
        val_zeroshot_images=val_zeroshot_images,
    )
    if data:  # explicit paths win over the folder's layout
        found = resolve_paths({"data": data, **paths}, needs_tokenizer=False)
        paths = {key: found[key] for key in paths}
    for kind in PAIR_SETS:
        if bool(paths[f"{kind}_ann"]) != bool(paths[f"{kind}_images"]):
            flag = kind.replace("_", "-")
            raise ValueError(f"--{flag}-ann and --{flag}-images go together: give both or neither")
    if not any(
        paths[key] for key in [f"{kind}_ann" for kind in PAIR_SETS] + ["zeroshot_images", "val_zeroshot_images"]
    ):
        raise ValueError(
            "nothing to check: give --train-ann/--train-images, --retrieval-ann/--retrieval-images, "
            "--zeroshot-images, their --val-... counterparts, or --data DIR"
        )
    if not 0 <= max_unreadable <= 1:
        raise ValueError(f"--max-unreadable {max_unreadable}: give a fraction between 0 and 1 (e.g. 0.01 for 1%)")
    workers = workers or os.cpu_count() or 1
    report: dict = {}
    for name in SETS:
        if name in PAIR_SETS and paths[f"{name}_ann"]:
            ann, images = paths[f"{name}_ann"], paths[f"{name}_images"]
            report[name] = _check_pairs(name, ann, images, max_words, progress, workers)
        elif name not in PAIR_SETS and paths[f"{name}_images"]:
            report[name] = _check_zeroshot(paths[f"{name}_images"], progress, workers)
    for name in SETS:
        if name in report:
            section = report[name]
            total = section["readable_images"] + len(section["unreadable_files"])
            section["unreadable_fraction"] = len(section["unreadable_files"]) / total if total else 0.0
            section["over_threshold"] = section["unreadable_fraction"] > max_unreadable
    report["max_unreadable"] = max_unreadable
    report["ok"] = all(report[name]["usable"] and not report[name]["over_threshold"] for name in SETS if name in report)
    return report


def format_report(report: dict, max_listed: int = 20) -> str:
    """The human-readable summary of :func:`check_data`'s result."""
    lines = []
    for name in SETS:
        if name not in report:
            continue
        section = report[name]
        where = section.get("ann_file") or section.get("root")
        lines.append(f"[{name}] {where}")
        if name.endswith("zeroshot"):
            per_class = section["images_per_class"]
            lines.append(
                f"  {section['classes']} classes, {section['images']} images "
                f"({per_class['min']}-{per_class['max']} per class), "
                f"class names from {'classnames.json' if section['classnames_file'] else 'folder ids'}"
            )
            if section["empty_classes"]:
                lines.append(f"  empty class folders: {', '.join(section['empty_classes'])}")
        else:
            lines.append(f"  {section['entries']} entries, images under {section['image_root']}")
            if name.endswith("retrieval") and section["captions_per_image"]:
                cpi = section["captions_per_image"]
                lines.append(f"  {section['texts']} captions, {cpi['min']}-{cpi['max']} per image (mean {cpi['mean']})")
            words = section["captions"]
            if words.get("count"):
                lines.append(
                    f"  caption words after cleaning: min {words['min_words']}, mean {words['mean_words']}, "
                    f"median {words['median_words']}, max {words['max_words']}; "
                    f"{words['empty_after_cleaning']} empty"
                )
            if words.get("empty_after_cleaning"):
                lines.append(
                    f"  WARNING: {words['empty_after_cleaning']} caption(s) are empty after cleaning "
                    "(only punctuation or blank); they train as empty texts"
                )
            dup = section.get("duplicates")
            if dup and dup["repeated_image_ids"]:
                lines.append(
                    f"  {dup['repeated_image_ids']} image id(s) used by several entries "
                    f"({dup['entries_with_repeated_ids']} entries; fine when one image has several "
                    f"captions), e.g. {', '.join(map(str, dup['repeated_id_examples']))}"
                )
            if dup and dup["ids_on_different_images"]:
                lines.append(
                    f"  WARNING: {dup['ids_on_different_images']} image id(s) name different image files, "
                    f"e.g. {', '.join(map(str, dup['different_images_examples']))}"
                )
            if dup and dup["repeated_pairs"]:
                lines.append(f"  WARNING: {dup['repeated_pairs']} entries repeat an earlier image-caption pair exactly")
        bad = section["unreadable_files"]
        lines.append(f"  readable images: {section['readable_images']}, unreadable: {len(bad)}")
        for item in bad[:max_listed]:
            lines.append(f"    {item['path']}: {item['reason']}")
        if len(bad) > max_listed:
            lines.append(f"    ... and {len(bad) - max_listed} more (use --json for the full list)")
        if section.get("hint"):
            lines.append(f"  {section['hint']}")
        if not section["usable"]:
            lines.append("  NOT USABLE: no readable image")
    lines.append("OK" if report["ok"] else "FAILED: " + "; ".join(_failures(report)))
    return "\n".join(lines)


def _failures(report: dict) -> list[str]:
    """Why each failing set fails, naming the threshold it crossed."""
    out = []
    for name in SETS:
        section = report.get(name)
        if section is None:
            continue
        bad = len(section["unreadable_files"])
        if not section["usable"]:
            out.append(f"{name} set has no readable image")
        elif section["over_threshold"]:
            out.append(
                f"{name} set has {bad} of {bad + section['readable_images']} images unreadable "
                f"({100 * section['unreadable_fraction']:.1f}%), above --max-unreadable "
                f"{report['max_unreadable']:g} ({100 * report['max_unreadable']:g}%)"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="python -m clipstudy check-data",
        description="Validate data sets (formats in docs/protocol.md) before training.",
    )
    parser.add_argument("--train-ann", help="training annotation JSON (list of image/caption/image_id)")
    parser.add_argument("--train-images", help="folder the training image paths are relative to")
    parser.add_argument("--retrieval-ann", help="retrieval annotation JSON (list of image/caption list)")
    parser.add_argument("--retrieval-images", help="folder the retrieval image paths are relative to")
    parser.add_argument("--zeroshot-images", help="ImageFolder root of the zero-shot set")
    parser.add_argument("--val-retrieval-ann", help="validation retrieval annotation JSON")
    parser.add_argument("--val-retrieval-images", help="folder the validation retrieval image paths are relative to")
    parser.add_argument("--val-zeroshot-images", help="ImageFolder root of the validation zero-shot set")
    parser.add_argument(
        "--data",
        help="data-folder shorthand: DIR/train.json, DIR/images, DIR/retrieval.json, DIR/zeroshot, "
        "DIR/val_retrieval.json, DIR/val_zeroshot (explicit options win)",
    )
    parser.add_argument("--max-words", type=int, default=30, help="caption word cap (default 30)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPU count)")
    parser.add_argument(
        "--max-unreadable",
        type=float,
        default=DEFAULT_MAX_UNREADABLE,
        metavar="FRACTION",
        help="fail (exit 1) when more than this fraction of a set's images is unreadable "
        f"(default {DEFAULT_MAX_UNREADABLE}, i.e. 1%%)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        report = check_data(
            train_ann=args.train_ann,
            train_images=args.train_images,
            retrieval_ann=args.retrieval_ann,
            retrieval_images=args.retrieval_images,
            zeroshot_images=args.zeroshot_images,
            val_retrieval_ann=args.val_retrieval_ann,
            val_retrieval_images=args.val_retrieval_images,
            val_zeroshot_images=args.val_zeroshot_images,
            data=args.data,
            max_words=args.max_words,
            progress=True,
            workers=args.workers,
            max_unreadable=args.max_unreadable,
        )
    except ValueError as error:  # DataError is reported by the dispatcher
        raise StartupError(f"check-data: {error}") from None
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
