"""The command-line parser every clipstudy command makes: :class:`CommandParser`.

An ``argparse.ArgumentParser`` with two differences, so all commands behave alike:

* options are never abbreviated (``allow_abbrev=False``): ``--epoch 1`` is an
  error, not silently ``--epochs 1``;
* a wrong argument is one line and exit status 2, naming the closest real
  option (``error: python -m clipstudy train: unknown option --optimzer (did
  you mean --optimizer?); ...``) instead of the whole usage (``--help`` shows it).

It imports nothing of clipstudy, so a command of any layer can use it.
"""

from __future__ import annotations

import argparse
import difflib
import sys


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` without abbreviations and with one-line errors that suggest an option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        """An unknown ``--option`` is named before anything else (argparse would first ask for a required one)."""
        args = sys.argv[1:] if args is None else list(args)
        known = set(option_strings(self))
        for word in args:
            if word == "--":
                break
            if word.startswith("--") and word.split("=", 1)[0] not in known:
                self.error(f"unrecognized arguments: {word}")
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        options = [word for word in unknown if word.startswith("-")]
        if options:
            message = "; ".join(f"unknown option {option}{suggestion(option, self)}" for option in options)
        self.exit(2, f"error: {self.prog}: {message}; `{self.prog} --help` lists the options\n")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` of ``parser`` and of its subcommands (argparse keeps them in ``_actions``)."""
    found = []
    for action in parser._actions:
        found += [option for option in action.option_strings if option.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += option_strings(sub)
    return list(dict.fromkeys(found))


def suggestion(option: str, parser: argparse.ArgumentParser) -> str:
    """``" (did you mean --optimizer?)"`` for ``--optimzer``; empty when no option is close."""
    close = difflib.get_close_matches(option.split("=", 1)[0], option_strings(parser), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
