"""Command line: LightningCLI with the ``test`` subcommand only (this tool evaluates, it never trains)."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tcube_lightning.data import EvaluationDataModule
from tcube_lightning.errors import InputError
from tcube_lightning.module import TCubeModule
from tcube_lightning.quiet import quiet_lightning


class RunFolder(SaveConfigCallback):
    """config.yaml is saved once testing starts, and a run stopped before that (bad input found in ``setup``,
    before any model loads) leaves no empty ``version_N/`` behind: Lightning makes the logger's folder, with an
    empty event file, before ``setup`` runs."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "test")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.already_saved or not trainer.is_global_zero or trainer.logger is None or trainer.logger.log_dir is None:
            return
        folder = Path(trainer.logger.log_dir)
        for own in folder.glob("events.out.tfevents.*"):  # the logger's empty start; nothing else is removed
            own.unlink()
        with contextlib.suppress(OSError):  # not empty: something else is in there, keep it
            folder.rmdir()


EXAMPLES = """examples:
  the embedded demo (built by `make demo`):
    main.py test --config configs/demo.yaml
  a modality with OpenAI CLIP ViT-B/16 and an expert, both files:
    main.py test --config configs/blood.yaml --model.pretrained_checkpoint models/clip_vit_b16.pt
      --model.expert_checkpoint models/blood_expert.pt --data.root data
  BiomedCLIP from the Hugging Face cache (HF_HUB_OFFLINE=1), a LoRA expert (peft folder or RobustMedCLIP model.pth):
    main.py test --config configs/blood.yaml --data.root data --model.expert_checkpoint models/blood_lora
      --model.arch hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    the cache (~/.cache/huggingface/hub or --model.cache_dir) must hold the model's open_clip_config.json and
    open_clip_pytorch_model.bin, and microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract's config.json,
    vocab.txt and tokenizer_config.json
  a transformers CLIPModel pair (PubMedCLIP-style folders; the architecture comes from the generalist's config.json):
    main.py test --config configs/blood.yaml --model.arch null --model.pretrained_checkpoint models/pubmedclip
      --model.expert_checkpoint models/pubmedclip_blood
"""


class TCubeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``test``, without the arguments this tool sets itself (model, data) or does not use (a checkpoint
        of a trained LightningModule: the models come from model.*_checkpoint)."""
        return {"test": {"model", "dataloaders", "datamodule", "ckpt_path"}}


def main(args: list[str] | None = None) -> TCubeCLI:
    """Entry point of ``main.py``, ``python -m tcube_lightning`` and the ``tcube-lightning`` script.

    Bad input (``InputError``) ends the run with its message and exit status 2, not a traceback. A run stopped by
    SIGTERM (a scheduler's preemption) exits 143: Lightning ends it with a ``SystemExit`` that would say 0.
    """
    quiet_lightning()
    try:
        return TCubeCLI(
            TCubeModule,
            EvaluationDataModule,
            args=args,
            save_config_callback=RunFolder,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # it never trains: no --optimizer / --lr_scheduler
            # No abbreviated options: `--model.gamm 2` must be an error, not gamma = 2.
            parser_kwargs={
                "description": "T³ test-time merging of a generalist and an expert CLIP.",
                "allow_abbrev": False,
                "test": {"epilog": EXAMPLES},
            },
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
