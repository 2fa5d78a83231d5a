"""The commands and what each does: the list ``main.py --help`` prints, answered here without importing Lightning or
torch (LightningCLI's own list knows only its ``test`` and ``predict``, described by the Trainer's generic
docstrings); the error for a missing or unknown command, with the closest one; and the form of every command line
error (``fail``)."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from tcube_lightning import __version__

COMMANDS = {
    "test": "evaluate T³ and every baseline on labelled splits (metrics, corruptions, deferral, figures)",
    "predict": "predict unlabelled images with T³ or any method (a CSV and Parquet table per source)",
    "inspect": "say what a checkpoint is before a run (format, architecture, mapping, LoRA, change from the "
    "generalist)",
}
"""Every command ``entry.main`` runs, in the order the help lists them."""

WIDTH = 80
"""The help's width: a terminal's, as argparse's help."""

HELP = "\n".join(
    [
        "usage: main.py <command> [options]",
        "",
        *textwrap.wrap(
            "T³ test-time merging of a generalist CLIP and a fine-tuned expert (or several experts: our extension "
            "of T³).",
            WIDTH,
        ),
        "",
        "commands:",
        *(
            textwrap.fill(summary, WIDTH, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12)
            for name, summary in COMMANDS.items()
        ),
        "",
        "Each command's options and examples: main.py <command> --help.",
        "The version: main.py --version.",
        "tcube-lightning and python -m tcube_lightning take the same commands.",
    ]
)


UNKNOWN_NAMES = (r"--([\w.]+)", r'[Kk]ey "([\w.]+)"', r"option '([\w.]+)'")
"""Where argparse's and jsonargparse's messages name an option or config key they do not know."""


def print_help() -> NoReturn:
    print(HELP)
    sys.exit(0)


def print_version() -> NoReturn:
    print(f"tcube-lightning {__version__}")
    sys.exit(0)


def refuse(given: str | None) -> NoReturn:
    """A missing or unknown command: the commands named (and the closest to ``given``)."""
    close = difflib.get_close_matches(given, list(COMMANDS), n=1) if given else []
    cause = f"unknown command {given!r}" if given else "a command is required"
    hint = f" (did you mean {close[0]}?)" if close else ""
    fail(f"{cause}{hint}: one of {', '.join(COMMANDS)}", "main.py", "the commands")


def say_error(cause: str) -> None:
    """One refused input on standard error, worded as every command of ``main.py`` words it."""
    print(f"tcube-lightning: error: {cause}", file=sys.stderr)


def fail(cause: str, prog: str, about: str = "the options", known: Sequence[str] = ()) -> NoReturn:
    """A command line refused, as every command says it: one line with its cause (and, for options or config keys it
    does not know, the closest of the ``known`` options), then where the help is; exit status 2."""
    close = [match for name in _unknown_names(cause) for match in difflib.get_close_matches(f"--{name}", known, n=1)]
    hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
    say_error(f"{cause}{hint}\nSee `{prog} --help` for {about}.")
    sys.exit(2)


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` a parser knows."""
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _unknown_names(message: str) -> list[str]:
    """The option or config key names an error message says are unknown (without their values)."""
    if not re.search(r"[Uu]nrecognized|not expected|[Nn]o action|does not accept", message):
        return []
    return [name for pattern in UNKNOWN_NAMES for name in re.findall(pattern, message)]
