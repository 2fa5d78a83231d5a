"""The command's entry point (``main.py``, ``python -m tcube_lightning``, the ``tcube-lightning`` script): the list of
commands and a missing or unknown one are answered without importing Lightning (``commands``); ``inspect`` reads files
with no Trainer, so it starts without Lightning too; ``test`` and ``predict`` go to LightningCLI (``app``)."""

from __future__ import annotations

import sys

from tcube_lightning.cli import commands


def main(args: list[str] | None = None) -> object:
    args = sys.argv[1:] if args is None else args
    if args in (["--help"], ["-h"]):
        commands.print_help()
    if args == ["--version"]:
        commands.print_version()
    if not args or (not args[0].startswith("-") and args[0] not in commands.COMMANDS):
        commands.refuse(args[0] if args else None)  # before LightningCLI, whose list lacks inspect
    if args[0] == "inspect":
        from tcube_lightning.cli import inspect_command

        inspect_command.main(args[1:])
        return None
    from tcube_lightning.cli.app import main as run

    return run(args)
