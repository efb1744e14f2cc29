"""``python -m clipstudy prepare-data SOURCE ...``: turn what people download into the study's formats.

One subcommand per source, each writing under ``--out OUT`` (formats in :mod:`clipstudy.data`)::

    cc3m           img2dataset output (``files`` or ``webdataset`` layout) -> OUT/train.json + OUT/images/cc3m/
    coco-karpathy  Karpathy's dataset_coco.json, split "test"            -> OUT/retrieval.json + OUT/images/coco (link)
    imagenet-val   flat ILSVRC2012_val_*.JPEG folder + labels            -> OUT/zeroshot/<wnid>/ (links)

The names follow the demo layout, so one OUT prepared by all three is also a
``--data OUT`` folder. Every subcommand reads each input once (progress bar on
stderr), never writes into its inputs, counts what it skips with the reason,
and ends by printing the configuration fields to pass on; with ``--json``
stdout holds exactly those fields as one JSON object. Rerunning on the same OUT
redoes only what changed: outputs are compared by content (JSON text, link
targets, digests of source and written images), not by existence.

Exit status 0, or 2 with a one-line message naming the file and the fix.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from clipstudy.checkpoint import atomic_write_text
from clipstudy.errors import StartupError
from clipstudy.zeroshot_data import imagenet_wnids


class PrepareError(StartupError):
    """An input cannot be used as given; the message names the file and the fix."""


@dataclass
class Prepared:
    """What a subcommand produced: the config fields to pass on and what it counted."""

    fields: dict[str, str]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)     # reason -> how many
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few names

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(name)


# --------------------------------------------------------------------------- output helpers

def progress_bar(iterable: Iterable | None = None, **kwargs):
    """tqdm on stderr (stdout is kept for the result)."""
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not kwargs.pop("progress", True), **kwargs)


def write_text_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless the file already holds exactly it; True if written."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write_text(path, text)
    return True


def write_json_if_changed(path: Path, value: Any) -> bool:
    return write_text_if_changed(path, json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def ensure_link(link: Path, target: Path) -> bool:
    """Make ``link`` a symbolic link to ``target`` (absolute); True if it had to be (re)made."""
    target = target.absolute()
    if link.is_symlink() and os.readlink(link) == str(target):
        return False
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise PrepareError(f"{link}: exists and is not a link this command made; remove it or choose another --out")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return True


def require_path(path: Path, what: str, fix: str, folder: bool = False) -> Path:
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        raise PrepareError(f"{path}: {what} not found; {fix}")
    return path


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PrepareError(f"{path}: not valid JSON ({error}); pass the {what}") from None


# --------------------------------------------------------------------------- coco-karpathy

def prepare_coco_karpathy(src: str | Path, images: str | Path, out: str | Path, split: str = "test",
                          progress: bool = True) -> Prepared:
    """The retrieval set from Karpathy's split file: the ``split`` images, captions in file order.

    Images stay where they are: ``OUT/images/coco`` links to ``images`` (the
    COCO root holding ``val2014/``), and each entry's path is
    ``coco/<filepath>/<filename>``. Images whose file is missing or empty and
    images without a caption are skipped and counted.
    """
    src, images, out = Path(src), Path(images), Path(out).absolute()
    fix = "pass Karpathy's dataset_coco.json (from caption_datasets.zip)"
    data = _read_json(require_path(src, "split file", fix), "Karpathy split file dataset_coco.json")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepareError(f"{src}: no 'images' list at the top level; {fix}")
    require_path(images, "COCO image root", "pass the folder that holds val2014/ (and train2014/)", folder=True)
    result = Prepared(fields={"retrieval_ann": str(out / "retrieval.json"),
                              "retrieval_images": str(out / "images")})
    entries = []
    for i, item in enumerate(progress_bar(data["images"], desc="coco-karpathy", unit="img", progress=progress)):
        if not isinstance(item, dict) or not {"filepath", "filename", "split", "sentences"} <= item.keys():
            raise PrepareError(f"{src}: images[{i}] lacks filepath/filename/split/sentences; {fix}")
        if item["split"] != split:
            continue
        relative = f"{item['filepath']}/{item['filename']}"
        captions = [s.get("raw", "") for s in item["sentences"] if isinstance(s, dict)]
        captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not captions:
            result.skip("no caption", relative)
            continue
        try:
            size = (images / relative).stat().st_size
        except OSError:
            size = -1
        if size <= 0:
            result.skip("image file missing or empty under the COCO root", relative)
            continue
        entries.append({"image": f"coco/{relative}", "caption": captions, "image_id": item.get("cocoid", i)})
    if not entries:
        raise PrepareError(f"{src}: no usable image of split {split!r} ({sum(result.skipped.values())} skipped: "
                           f"{dict(result.skipped)}); check the file and that --images holds val2014/")
    ensure_link(out / "images" / "coco", images)
    write_json_if_changed(out / "retrieval.json", entries)
    result.counts = {"images": len(entries), "captions": sum(len(e["caption"]) for e in entries)}
    return result


# --------------------------------------------------------------------------- imagenet-val

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)


def read_loc_val_solution(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv`` -> {image stem: wnid} (the first token of PredictionString)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise PrepareError(f"{path}: expected the columns ImageId,PredictionString of LOC_val_solution.csv; "
                               "pass that file or the devkit's ILSVRC2012_validation_ground_truth.txt")
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
        raise PrepareError(f"{meta_mat}: not the devkit's meta.mat ({error}); pass data/meta.mat of "
                           "ILSVRC2012_devkit_t12 with --meta") from None


def read_devkit_ground_truth(path: Path, meta_mat: Path) -> dict[str, str]:
    """Devkit ground truth (line i = ILSVRC2012_ID of ILSVRC2012_val_<i>) -> {image stem: wnid}."""
    id_to_wnid = read_devkit_meta(require_path(meta_mat, "devkit meta.mat",
                                           "pass it with --meta (it sits beside the ground truth in data/)"))
    labels = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").split(), start=1):
        try:
            labels[f"ILSVRC2012_val_{line_number:08d}"] = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise PrepareError(f"{path}: line {line_number} is {line!r}, not an ILSVRC2012_ID of {meta_mat}; "
                               "pass the devkit's ILSVRC2012_validation_ground_truth.txt") from None
    return labels


def read_val_labels(labels: Path, meta: Path | None) -> dict[str, str]:
    require_path(labels, "label file", "pass LOC_val_solution.csv or the devkit's ILSVRC2012_validation_ground_truth.txt")
    if labels.suffix.lower() == ".csv":
        return read_loc_val_solution(labels)
    return read_devkit_ground_truth(labels, meta or labels.parent / "meta.mat")


def prepare_imagenet_val(src: str | Path, labels: str | Path, out: str | Path, meta: str | Path | None = None,
                         progress: bool = True) -> Prepared:
    """An ImageFolder of links, ``OUT/zeroshot/<wnid>/ILSVRC2012_val_*.JPEG``, from the flat val folder.

    A folder is made for each of clipstudy's 1000 WordNet ids (empty if no
    image has that label), so the sorted folder order - the class index - is
    clipstudy's class order (:func:`clipstudy.zeroshot_data.imagenet_wnids`) whatever
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
    for entry in progress_bar(sorted(os.scandir(src), key=lambda e: e.name), desc="imagenet-val", unit="img",
                              progress=progress):
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
        raise PrepareError(f"{src}: none of its files has a usable label in {labels} ({dict(result.skipped)}); "
                           "pass the folder of ILSVRC2012_val_*.JPEG and its label file")
    for wnid in known:
        (root / wnid).mkdir(parents=True, exist_ok=True)
    for old in root.glob("*/*"):
        if old.is_symlink() and old not in wanted:
            old.unlink()
    made = sum(ensure_link(link, target) for link, target in wanted.items())
    result.counts = {"images": len(wanted), "classes": len(known),
                     "classes_with_images": len({link.parent.name for link in wanted}),
                     "labels_without_image": missing, "links_made": made}
    return result


# --------------------------------------------------------------------------- CLI

def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; inputs are never written)")
    parser.add_argument("--json", action="store_true",
                        help="print only the config fields to pass on, as one JSON object on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipstudy prepare-data",
                                     description="Convert downloaded data sets into the study's formats.")
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    cc3m = sources.add_parser("cc3m", help="img2dataset output (files or webdataset layout) -> training pairs")
    cc3m.add_argument("--src", required=True, help="img2dataset --output_folder")
    cc3m.add_argument("--limit", type=int, default=0, help="keep N usable pairs (0 = all), chosen by --seed")
    cc3m.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    cc3m.add_argument("--max-side", type=int, default=0,
                      help="resize so the longer side is at most this (JPEG); 0 = link/copy as downloaded")
    cc3m.add_argument("--workers", type=int, default=0, help="decoding threads (default: CPU count)")
    coco = sources.add_parser("coco-karpathy", help="Karpathy's dataset_coco.json -> retrieval set (test split)")
    coco.add_argument("--src", required=True, help="dataset_coco.json")
    coco.add_argument("--images", required=True, help="COCO root holding val2014/")
    imagenet = sources.add_parser("imagenet-val", help="flat ILSVRC2012 val folder + labels -> ImageFolder")
    imagenet.add_argument("--src", required=True, help="folder of ILSVRC2012_val_*.JPEG")
    imagenet.add_argument("--labels", required=True,
                          help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt")
    imagenet.add_argument("--meta", help="devkit meta.mat (default: beside --labels)")
    for sub in (cc3m, coco, imagenet):
        _add_common(sub)
    return parser


def run(args: argparse.Namespace) -> Prepared:
    progress = not args.no_progress
    if args.source == "cc3m":
        from clipstudy.prepare_cc3m import prepare_cc3m

        return prepare_cc3m(args.src, args.out, limit=args.limit, seed=args.seed, max_side=args.max_side,
                            workers=args.workers, progress=progress)
    if args.source == "coco-karpathy":
        return prepare_coco_karpathy(args.src, args.images, args.out, progress=progress)
    return prepare_imagenet_val(args.src, args.labels, args.out, meta=args.meta, progress=progress)


def format_summary(source: str, result: Prepared) -> str:
    lines = [f"[{source}] " + ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in result.counts.items())]
    for reason, count in result.skipped.most_common():
        lines.append(f"  skipped {count}: {reason} (e.g. {', '.join(result.examples[reason])})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        result = run(args)
    except PrepareError as error:
        print(f"prepare-data {args.source}: {error}", file=sys.stderr)
        return 2
    print(format_summary(args.source, result), file=sys.stderr)
    if args.json:
        print(json.dumps(result.fields))
    else:
        print("config fields to pass on (train --FIELD VALUE, sweep --set FIELD=VALUE):")
        for key, value in result.fields.items():
            print(f"  {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
