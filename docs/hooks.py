"""MkDocs hooks: the CLI reference is generated from the command line's own parser at every build, so that it cannot
drift from the code (``<!-- cli: test -->`` in a page becomes the options of ``python main.py test --help``,
``<!-- cli: commands -->`` the list of commands); every figure links to itself at full size; a page that writes Greek
symbols names them once at its end, so that searching "gamma" finds the pages that write γ."""

from __future__ import annotations

import contextlib
import io
import re
import sys

MARKER = re.compile(r"<!-- cli: (commands|test|predict|inspect) -->")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
"""Bytes that are no text (argparse's help holds a backspace in ``--print_config``'s metavar)."""
IMAGE = re.compile(r"(?<!\[)!\[([^\]]*)\]\(([^)\s]+\.png)\)")
SYMBOLS = {"γ": "gamma", "λ": "lambda", "θ": "theta", "δ": "delta", "α": "alpha", "τ": "tau", "σ": "sigma"}


def cli_help(command: str) -> str:
    """What ``python main.py <command> --help`` prints, from the same parser, in this process: a command's options (its
    usage summary and description left out), or with ``commands`` the list ``python main.py --help`` prints."""
    from tcube_lightning.cli.entry import main

    buffer, program = io.StringIO(), sys.argv[0]
    sys.argv[0] = "main.py"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(["--help"] if command == "commands" else [command, "--help"])
    finally:
        sys.argv[0] = program
    text = CONTROL.sub("", buffer.getvalue())
    if command == "commands":
        return text.rstrip()
    start = min(text.index(header) for header in ("\npositional arguments:", "\noptions:") if header in text)
    return text[start + 1 :].rstrip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = MARKER.sub(lambda match: f"```text\n{cli_help(match.group(1))}\n```", markdown)
    markdown = IMAGE.sub(r"[![\1](\2)](\2)", markdown)  # a click opens the figure at full size
    named = [f"{symbol} {name}" for symbol, name in SYMBOLS.items() if symbol in markdown]
    if named:
        markdown += "\n\n---\n*Symbols on this page: " + ", ".join(named) + ".*\n"
    return markdown
