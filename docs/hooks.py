"""MkDocs hook: the CLI reference is generated from the command line's own parser at every build, so that it cannot
drift from the code (``<!-- cli: test -->`` in a page becomes the options of ``python main.py test --help``)."""

from __future__ import annotations

import contextlib
import io
import re
import sys

MARKER = re.compile(r"<!-- cli: (test|predict) -->")


def cli_help(subcommand: str) -> str:
    """The options ``python main.py <subcommand> --help`` lists (its usage summary left out), from the same parser, in
    this process."""
    from tcube_lightning.cli.app import main

    buffer, program = io.StringIO(), sys.argv[0]
    sys.argv[0] = "main.py"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main([subcommand, "--help"])
    finally:
        sys.argv[0] = program
    text = buffer.getvalue()
    return text[text.index("\noptions:") + 1 :].rstrip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda match: f"```text\n{cli_help(match.group(1))}\n```", markdown)
