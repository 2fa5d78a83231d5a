"""Command line: LightningCLI with the ``test`` subcommand only (this tool evaluates, it never trains)."""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from tcube_lightning.data import EvaluationDataModule
from tcube_lightning.errors import InputError
from tcube_lightning.module import TCubeModule


class TCubeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}}


def main(args: list[str] | None = None) -> TCubeCLI:
    """Entry point of ``main.py``, ``python -m tcube_lightning`` and the ``tcube-lightning`` script.

    Bad input (``InputError``) ends the run with its message and exit status 2, not a traceback.
    """
    # Lightning's own use of a torch API that torch 2.14 deprecates: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    try:
        return TCubeCLI(
            TCubeModule,
            EvaluationDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": "T³ test-time merging of a generalist and an expert CLIP."},
        )
    except InputError as err:
        print(f"tcube-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)
