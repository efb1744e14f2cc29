"""ImageNet -> ImageFolders of links: the val images + labels (LOC_val_solution.csv or the devkit) as the
zero-shot test set, a class-balanced slice of the train folder as the zero-shot validation set."""

from __future__ import annotations

import csv
import os
import random
import re
from pathlib import Path

from clipstudy.data.prepare.common import Prepared, PrepareError, ensure_link, progress_bar, require_path
from clipstudy.data.zeroshot import imagenet_wnids

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)


def read_loc_val_solution(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv`` -> {image stem: wnid} (the first token of PredictionString)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise PrepareError(
                f"{path}: expected the columns ImageId,PredictionString of LOC_val_solution.csv; "
                "pass that file or the devkit's ILSVRC2012_validation_ground_truth.txt"
            )
        return {row["ImageId"]: (row["PredictionString"] or "").split(" ")[0] for row in reader}


def read_devkit_meta(meta_mat: Path) -> dict[int, str]:
    """``meta.mat`` of the ILSVRC2012 devkit -> {ILSVRC2012_ID: wnid} for the 1000 leaf classes.

    The devkit numbers classes 1..1000 in its own order, which is not the
    sorted-WordNet-id order that class indices use.
    """
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(meta_mat), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except (ValueError, KeyError, IndexError, TypeError, OSError) as error:
        raise PrepareError(
            f"{meta_mat}: not the devkit's meta.mat ({error}); pass data/meta.mat of ILSVRC2012_devkit_t12 with --meta"
        ) from None


def read_devkit_ground_truth(path: Path, meta_mat: Path) -> dict[str, str]:
    """Devkit ground truth (line i = ILSVRC2012_ID of ILSVRC2012_val_<i>) -> {image stem: wnid}."""
    id_to_wnid = read_devkit_meta(
        require_path(meta_mat, "devkit meta.mat", "pass it with --meta (it sits beside the ground truth in data/)")
    )
    labels = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").split(), start=1):
        try:
            labels[f"ILSVRC2012_val_{line_number:08d}"] = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise PrepareError(
                f"{path}: line {line_number} is {line!r}, not an ILSVRC2012_ID of {meta_mat}; "
                "pass the devkit's ILSVRC2012_validation_ground_truth.txt"
            ) from None
    return labels


def read_val_labels(labels: Path, meta: Path | None) -> dict[str, str]:
    require_path(
        labels, "label file", "pass LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt"
    )
    if labels.suffix.lower() == ".csv":
        return read_loc_val_solution(labels)
    return read_devkit_ground_truth(labels, meta or labels.parent / "meta.mat")


def prepare_imagenet_val(
    src: str | Path, labels: str | Path, out: str | Path, meta: str | Path | None = None, progress: bool = True
) -> Prepared:
    """An ImageFolder of links, ``OUT/zeroshot/<wnid>/ILSVRC2012_val_*.JPEG``, from the flat val folder.

    A folder is made for each of clipstudy's 1000 WordNet ids (empty if no
    image has that label), so the sorted folder order - the class index - is
    clipstudy's class order (:func:`clipstudy.data.zeroshot.imagenet_wnids`) whatever
    subset of images is present. Links left by an earlier run that no longer
    apply are removed.
    """
    src, labels, out = Path(src), Path(labels), Path(out).absolute()
    require_path(src, "validation image folder", "pass the flat folder of ILSVRC2012_val_*.JPEG", folder=True)
    label_of = read_val_labels(labels, Path(meta) if meta else None)
    known = set(imagenet_wnids())
    root = out / "zeroshot"
    result = Prepared(fields={"zeroshot_images": str(root)})
    wanted: dict[Path, Path] = {}
    seen = set()
    for entry in progress_bar(
        sorted(os.scandir(src), key=lambda e: e.name), desc="imagenet-val", unit="img", progress=progress
    ):
        match = VAL_NAME.match(entry.name)
        if not match or not entry.is_file():
            result.skip("not an ILSVRC2012_val_*.JPEG file", entry.name)
            continue
        stem = entry.name.rsplit(".", 1)[0]
        seen.add(stem)
        wnid = label_of.get(stem)
        if wnid is None:
            result.skip(f"no label in {labels.name}", entry.name)
        elif wnid not in known:
            result.skip("label is not one of the 1000 ImageNet-1k WordNet ids", f"{entry.name} ({wnid})")
        elif entry.stat().st_size == 0:
            result.skip("empty file", entry.name)
        else:
            wanted[root / wnid / entry.name] = src.absolute() / entry.name
    missing = len(set(label_of) - seen)
    if not wanted:
        raise PrepareError(
            f"{src}: none of its files has a usable label in {labels} ({dict(result.skipped)}); "
            "pass the folder of ILSVRC2012_val_*.JPEG and its label file"
        )
    for wnid in known:
        (root / wnid).mkdir(parents=True, exist_ok=True)
    for old in root.glob("*/*"):
        if old.is_symlink() and old not in wanted:
            old.unlink()
    made = sum(ensure_link(link, target) for link, target in wanted.items())
    result.counts = {
        "images": len(wanted),
        "classes": len(known),
        "classes_with_images": len({link.parent.name for link in wanted}),
        "labels_without_image": missing,
        "links_made": made,
    }
    return result


TRAIN_NAME = re.compile(r"^(n\d{8})_\d+\.JPEG$", re.IGNORECASE)


def prepare_imagenet_train_slice(
    src: str | Path, out: str | Path, per_class: int = 10, seed: int = 0, progress: bool = True
) -> Prepared:
    """The zero-shot *validation* set: ``per_class`` images of every class from the ImageNet train folder
    (``train/<wnid>/<wnid>_N.JPEG``, extracted), linked as ``OUT/val_zeroshot/<wnid>/``.

    Class-balanced and disjoint from the test set (the val images) by construction; which images of a
    class is a seeded choice over its sorted file names, so the slice repeats exactly. A folder is made
    for every one of clipstudy's 1000 WordNet ids, as for the test set (same class order). A class with
    fewer usable images than ``per_class`` keeps what it has, counted.
    """
    src, out = Path(src), Path(out).absolute()
    require_path(
        src, "ImageNet train folder", "pass the extracted train/ folder (one n######## folder per class)", folder=True
    )
    if per_class < 1:
        raise PrepareError(f"--per-class {per_class}: give at least 1 image per class")
    root = out / "val_zeroshot"
    result = Prepared(fields={"val_zeroshot_images": str(root)})
    rng = random.Random(seed)
    wanted: dict[Path, Path] = {}
    short = 0
    for wnid in progress_bar(imagenet_wnids(), desc="imagenet-train-slice", unit="class", progress=progress):
        folder = src / wnid
        if not folder.is_dir():
            result.skip("class folder missing in the train folder", wnid)
            continue
        names = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.stat().st_size > 0)
        usable = [n for n in names if TRAIN_NAME.match(n) and n.startswith(wnid)]
        for name in sorted(set(names) - set(usable)):  # sorted: the examples shown are the same every run
            result.skip("not a <wnid>_N.JPEG file of its class", f"{wnid}/{name}")
        chosen = sorted(rng.sample(usable, min(per_class, len(usable))))
        short += len(chosen) < per_class
        wanted.update({root / wnid / name: folder.absolute() / name for name in chosen})
    if not wanted:
        raise PrepareError(f"{src}: no class folder with images; pass the extracted ImageNet train/ folder")
    for wnid in imagenet_wnids():
        (root / wnid).mkdir(parents=True, exist_ok=True)
    for old in root.glob("*/*"):
        if old.is_symlink() and old not in wanted:
            old.unlink()
    made = sum(ensure_link(link, target) for link, target in wanted.items())
    result.counts = {
        "images": len(wanted),
        "classes_with_images": len({link.parent.name for link in wanted}),
        "classes_short_of_per_class": short,
        "links_made": made,
    }
    return result
