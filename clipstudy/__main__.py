"""Command line: ``python -m clipstudy <command> [options]``.

Each command lives in the module that owns the concern; this file only
dispatches, so importing it stays cheap.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "check-data": ("clipstudy.checkdata", "main", "validate a data set before training"),
    "make-demo-data": ("clipstudy.demo_data", "main", "generate the embedded synthetic benchmark"),
    "prepare-data": ("clipstudy.prepare_data", "main", "turn CC3M / COCO / ImageNet downloads into the formats"),
    "fetch-weights": ("clipstudy.models", "fetch_weights_main", "download pretrained weights into the local caches"),
    "train": ("clipstudy.cli", "train_main", "train and evaluate one optimizer x loss cell"),
    "evaluate": ("clipstudy.cli", "evaluate_main", "evaluate a saved checkpoint"),
    "sweep": ("clipstudy.sweep", "main", "run the optimizer x loss grid through papermill"),
    "choose-lr": ("clipstudy.lrsearch", "main", "pick one learning rate for every optimizer (short search)"),
    "report": ("clipstudy.report", "main", "render the analysis notebook to HTML"),
}


def usage() -> str:
    lines = ["usage: python -m clipstudy <command> [options]", "", "commands:"]
    for name, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<16} {help_}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"clipstudy: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
