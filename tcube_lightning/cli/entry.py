"""The command's entry point (``main.py``, ``python -m tcube_lightning``, the ``tcube-lightning`` script): ``inspect``
reads files with no Trainer, so it starts without importing Lightning; ``test`` and ``predict`` go to LightningCLI
(``app``)."""

from __future__ import annotations

import sys


def main(args: list[str] | None = None) -> object:
    args = sys.argv[1:] if args is None else args
    if args[:1] == ["inspect"]:
        from tcube_lightning.cli import inspect_command

        inspect_command.main(args[1:])
        return None
    from tcube_lightning.cli.app import main as run

    return run(args)
