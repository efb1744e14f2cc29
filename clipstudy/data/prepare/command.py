"""``python -m clipstudy prepare-data SOURCE ...``: turn what people download into the study's formats.

One subcommand per source, each writing under ``--out OUT`` (formats in :mod:`clipstudy.data.datasets`)::

    cc3m                  img2dataset output (``files`` or ``webdataset`` layout) -> OUT/train.json + OUT/images/cc3m/
    coco-karpathy         Karpathy's dataset_coco.json -> OUT/retrieval.json (test), OUT/val_retrieval.json (val)
                          + OUT/images/coco (link)
    imagenet-val          flat ILSVRC2012_val_*.JPEG folder + labels -> OUT/zeroshot/<wnid>/ (links; test)
    imagenet-train-slice  ImageNet train folder -> OUT/val_zeroshot/<wnid>/ (links; N a class; validation)

The names follow the demo layout (:mod:`clipstudy.data.layout`), so one OUT prepared by all four is also a
``--data OUT`` folder. Every subcommand reads each input once (progress bar on
stderr), never writes into its inputs, counts what it skips with the reason,
and ends by printing the configuration fields to pass on; with ``--json``
stdout holds exactly those fields as one JSON object. Rerunning on the same OUT
redoes only what changed: outputs are compared by content (JSON text, link
targets, digests of source and written images), not by existence.

Exit status 0, or 2 with a one-line ``error: prepare-data SOURCE: ...`` naming the file and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys

from clipstudy.arguments import CommandParser
from clipstudy.data.prepare.common import Prepared, PrepareError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (created; inputs are never written)")
    parser.add_argument(
        "--json", action="store_true", help="print only the config fields to pass on, as one JSON object on stdout"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m clipstudy prepare-data", description="Convert downloaded data sets into the study's formats."
    )
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    cc3m = sources.add_parser("cc3m", help="img2dataset output (files or webdataset layout) -> training pairs")
    cc3m.add_argument("--src", required=True, help="img2dataset --output_folder")
    cc3m.add_argument("--limit", type=int, default=0, help="keep N usable pairs (0 = all), chosen by --seed")
    cc3m.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    cc3m.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="resize so the longer side is at most this (JPEG); 0 = link/copy as downloaded",
    )
    cc3m.add_argument("--workers", type=int, default=0, help="decoding threads (default: CPU count)")
    coco = sources.add_parser(
        "coco-karpathy", help="Karpathy's dataset_coco.json -> retrieval sets (test split, val split for validation)"
    )
    coco.add_argument("--src", required=True, help="dataset_coco.json")
    coco.add_argument("--images", required=True, help="COCO root holding val2014/")
    imagenet = sources.add_parser("imagenet-val", help="flat ILSVRC2012 val folder + labels -> ImageFolder")
    imagenet.add_argument("--src", required=True, help="folder of ILSVRC2012_val_*.JPEG")
    imagenet.add_argument(
        "--labels", required=True, help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt"
    )
    imagenet.add_argument("--meta", help="devkit meta.mat (default: beside --labels)")
    train_slice = sources.add_parser(
        "imagenet-train-slice", help="ImageNet train folder -> class-balanced zero-shot validation set"
    )
    train_slice.add_argument("--src", required=True, help="the extracted train/ folder (one n######## folder a class)")
    train_slice.add_argument("--per-class", type=int, default=10, help="images per class (default 10: 10,000 images)")
    train_slice.add_argument("--seed", type=int, default=0, help="seed of the choice within each class (default 0)")
    for sub in (cc3m, coco, imagenet, train_slice):
        _add_common(sub)
    return parser


def run(args: argparse.Namespace) -> Prepared:
    # the converters are imported here, not at the top: `prepare-data --help` stays quick (no torch)
    from clipstudy.data.prepare.cc3m import prepare_cc3m
    from clipstudy.data.prepare.coco import prepare_coco_karpathy
    from clipstudy.data.prepare.imagenet import prepare_imagenet_train_slice, prepare_imagenet_val

    progress = not args.no_progress
    if args.source == "cc3m":
        return prepare_cc3m(
            args.src,
            args.out,
            limit=args.limit,
            seed=args.seed,
            max_side=args.max_side,
            workers=args.workers,
            progress=progress,
        )
    if args.source == "coco-karpathy":
        return prepare_coco_karpathy(args.src, args.images, args.out, progress=progress)
    if args.source == "imagenet-train-slice":
        return prepare_imagenet_train_slice(args.src, args.out, args.per_class, args.seed, progress=progress)
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
    except PrepareError as error:  # the dispatcher prints it as one `error:` line, exit 2
        raise PrepareError(f"prepare-data {args.source}: {error}") from None
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
