"""Command line: LightningCLI with the ``test`` subcommand only (this tool evaluates, it never trains)."""

from __future__ import annotations

import signal
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tcube_lightning.data import EvaluationDataModule
from tcube_lightning.errors import InputError
from tcube_lightning.module import TCubeModule


class TCubeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"test": {"model", "dataloaders", "datamodule"}}


def main(args: list[str] | None = None) -> TCubeCLI:
    """Entry point of ``main.py``, ``python -m tcube_lightning`` and the ``tcube-lightning`` script.

    Bad input (``InputError``) ends the run with its message and exit status 2, not a traceback. A run stopped by
    SIGTERM (a scheduler's preemption) exits 143: Lightning ends it with a ``SystemExit`` that would say 0.
    """
    # Lightning's own use of a torch API that torch 2.14 deprecates: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    try:
        return TCubeCLI(
            TCubeModule,
            EvaluationDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            # No abbreviated options: `--model.gamm 2` must be an error, not gamma = 2.
            parser_kwargs={"description": "T³ test-time merging of a generalist and an expert CLIP.", "allow_abbrev": False},
        )
    except InputError as err:
        print(f"tcube-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        print(
            "tcube-lightning: stopped by SIGTERM before the last split; results.json holds the splits finished so far "
            "(its missing_splits names the rest): run again with --model.resume true to complete it",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)
