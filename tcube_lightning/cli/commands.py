"""The commands and what each does: the list ``main.py --help`` prints, answered here without importing Lightning or
torch (LightningCLI's own list knows only its ``test`` and ``predict``, described by the Trainer's generic
docstrings), and the error for a missing or unknown command, with the closest one."""

from __future__ import annotations

import difflib
import sys
import textwrap
from typing import NoReturn

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
        "tcube-lightning and python -m tcube_lightning take the same commands.",
    ]
)


def print_help() -> NoReturn:
    print(HELP)
    sys.exit(0)


def refuse(given: str | None) -> NoReturn:
    """A missing or unknown command: one line naming the commands (and the closest to ``given``), exit status 2."""
    close = difflib.get_close_matches(given, list(COMMANDS), n=1) if given else []
    cause = f"unknown command {given!r}" if given else "a command is required"
    hint = f" (did you mean {close[0]}?)" if close else ""
    sys.stderr.write(f"tcube-lightning: error: {cause}{hint}: one of {', '.join(COMMANDS)}\n")
    sys.stderr.write("See `main.py --help` for the commands.\n")
    sys.exit(2)
