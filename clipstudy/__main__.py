"""Command line: ``python -m clipstudy <command> [options]``.

Each command lives in the module that owns the concern; this file only
dispatches, so importing it stays cheap, and turns the user-facing errors of
:mod:`clipstudy.errors` into one line and an exit status (2: cannot start as
given; 1: a write or the run failed; 130: interrupted). ``--debug`` anywhere
on the command line, or ``CLIPSTUDY_DEBUG=1``, shows the traceback as well,
with the same exit status.

Each command parses its own options with :class:`clipstudy.arguments.CommandParser`
(no abbreviations; a wrong option is one line suggesting the closest one).
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import traceback

from clipstudy import errors

COMMANDS = {
    "check-data": ("clipstudy.data.check", "main", "validate a data set before training"),
    "make-demo-data": ("clipstudy.data.demo", "main", "generate the embedded synthetic benchmark"),
    "prepare-data": (
        "clipstudy.data.prepare.command",
        "main",
        "turn CC3M / COCO / ImageNet downloads into the formats",
    ),
    "fetch-weights": (
        "clipstudy.cli.commands",
        "fetch_weights_main",
        "download pretrained weights into the local caches",
    ),
    "train": ("clipstudy.cli.commands", "train_main", "train and evaluate one optimizer x loss cell"),
    "evaluate": ("clipstudy.cli.commands", "evaluate_main", "evaluate a saved checkpoint"),
    "list": ("clipstudy.cli.commands", "list_main", "the registered losses and optimizers"),
    "sweep": ("clipstudy.study.sweep", "main", "run the optimizer x loss grid through papermill"),
    "tune": ("clipstudy.study.tune", "main", "equal-budget learning-rate search per optimizer, on validation"),
    "study": ("clipstudy.study.protocols", "main", "the fair benchmark: tune, shared and tuned protocols, report"),
    "report": ("clipstudy.cli.commands", "report_main", "render the analysis notebook to HTML"),
}


def usage() -> str:
    lines = ["usage: python -m clipstudy <command> [options]", "", "commands:"]
    for name, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<16} {help_}")
    lines += [
        "",
        "`python -m clipstudy <command> --help` lists a command's options; --debug (or "
        f"{errors.DEBUG_VARIABLE}=1) shows tracebacks as well as the one-line errors.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------- dispatching
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(errors.DEBUG_VARIABLE, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"clipstudy: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except errors.ClipstudyError as err:
        return report(f"error: {errors.one_line(err)}", err.exit_code, debug)
    except OSError as err:  # a file the command reads or writes, outside the records (those raise WriteFailure)
        where = f"{err.filename}: " if err.filename else ""
        return report(
            f"error: {where}{err.strerror or err}; check the paths, their permissions and the free disk space "
            "(--debug shows where it happened)",
            1,
            debug,
        )
    except KeyboardInterrupt as err:
        return report(f"stopped: {errors.one_line(err) if str(err) else 'interrupted'}", 130, debug)


def report(line: str, code: int, debug: bool) -> int:
    """Print the one-line message (after the traceback with ``--debug``); return the exit status."""
    if debug:
        traceback.print_exc()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
