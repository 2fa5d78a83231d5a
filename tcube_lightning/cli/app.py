"""Command line: LightningCLI with the ``test`` and ``predict`` subcommands only (this tool evaluates and predicts, it
never trains)."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from tcube_lightning.cli import strict_yaml
from tcube_lightning.cli.commands import say_error
from tcube_lightning.cli.configpaths import absolute_namespace_paths, inline_config_files
from tcube_lightning.cli.parser import EvaluationParser
from tcube_lightning.data.datamodule import EvaluationDataModule
from tcube_lightning.errors import InputError
from tcube_lightning.evaluation.module import TCubeModule
from tcube_lightning.quiet import quiet_lightning
from tcube_lightning.reporting.runfolder import discard_own


class RunFolder(SaveConfigCallback):
    """Keeps a run's folder to what the run did: config.yaml is saved once the first split is finished (so that a run
    stopped before, by bad input found after the models load or by an interruption, replaces no earlier config and
    leaves nothing of its own behind: ``runfolder.discard_own``). Saved by rank 0 alone, into the folder every rank
    learnt at the start: a collective call here would wait forever for a process that reads no batch of a split."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx > 0:  # the module finished the first split in this batch's step
            self._save(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)

    on_predict_batch_end = on_test_batch_end
    on_predict_end = on_test_end

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        folder = pl_module.report.results_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config, str(folder / self.config_filename), skip_unset=False, overwrite=True, multifile=self.multifile
        )
        self.already_saved = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and not getattr(pl_module, "results_written", False):
            report = getattr(pl_module, "report", None)  # the run's folder, once the run has started
            folder = report.results_dir if report else Path(pl_module.hparams.results_dir or trainer.log_dir)
            discard_own(folder, pl_module.started)


INTERRUPTS: list[int] = []
"""SIGINTs received by this run (Lightning turns the KeyboardInterrupt into an exit status of 1)."""

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


FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")
"""Loggers that write into a folder; with model.results_dir they write into it, beside the results."""


def logger_in(results_dir: str, logger: object) -> object:
    """The configured logger (None or True: Lightning's default, TensorBoard's) writing into ``results_dir``."""
    if logger is None or logger is True:
        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace())
    if isinstance(logger, list):
        return [logger_in(results_dir, each) for each in logger]
    if isinstance(logger, Namespace) and logger.class_path.rsplit(".", 1)[-1] in FOLDER_LOGGERS:
        logger.init_args = Namespace(**{**vars(logger.init_args), "save_dir": results_dir, "name": "", "version": ""})
    return logger


PREDICT_EXAMPLES = """examples:
  T³'s predictions for a folder of unlabelled images (nested folders too), with the demo's models:
    main.py predict --config configs/demo.yaml --data.sources '{scans: /path/to/scans}'
  several methods, into a folder of your own (predictions/<source>.csv and .parquet):
    main.py predict --config configs/demo.yaml --data.sources '{clinic: export.npz}'
      --model.methods '[t3, t3_batch, dawin]' --model.results_dir predictions_run
"""


SUBCOMMAND_HELP = {
    "test": (
        "Evaluate T³ and every baseline on labelled splits: a generalist CLIP and one expert (or several: our "
        "extension of T³), each split's metrics, corruption errors, deferral and the figures, written to the run's "
        "folder (results.json, results.md, summary.*). Options below: the models and methods (--model.*), then the "
        "data (--data.*), then the Trainer's (--trainer.*: devices, precision, loggers).",
        EXAMPLES,
    ),
    "predict": (
        "Predict unlabelled images (folders, npz, Hugging Face datasets, DICOM) with T³ or any method, one CSV and "
        "Parquet table per source in the run's folder. Options below: the models and methods (--model.*), then the "
        "data (--data.*), then the Trainer's (--trainer.*).",
        PREDICT_EXAMPLES,
    ),
}
"""Each subcommand's help: its description, and its examples (printed line for line)."""


class RawEpilogFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with the examples' lines kept as written (argparse re-wraps them into one paragraph)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def subcommand_help(name: str) -> dict:
    description, epilog = SUBCOMMAND_HELP[name]
    usage = f"main.py {name} [--config CONFIG] [--model.* …] [--data.* …] [--trainer.* …]"
    return {"description": description, "epilog": epilog, "usage": usage, "formatter_class": RawEpilogFormatter}


DEVICE_WORDS = re.compile(r"accelerator|device|gpu|cuda|mps|tpu|hpu|xla", re.IGNORECASE)
"""What a Trainer's refusal says when it is about the machine rather than another setting (``limit_test_batches``)."""


class TCubeCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only ``test`` and ``predict``, without the arguments this tool sets itself (model, data) or does not use (a
        checkpoint of a trained LightningModule: the models come from model.*_checkpoint)."""
        return {
            "test": {"model", "dataloaders", "datamodule", "ckpt_path"},
            "predict": {"model", "dataloaders", "datamodule", "ckpt_path", "return_predictions"},
        }

    def add_core_arguments_to_parser(self, parser: EvaluationParser) -> None:
        """LightningCLI's, in the order ``--help`` shows them: this tool's options (the models and methods, the data)
        first, then the Trainer's, less those only training uses."""
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_lightning_class_args(self._datamodule_class, "data")
        parser.add_trainer_arguments(self.trainer_class)
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """LightningCLI's Trainer; settings it refuses are bad input, said in one line before any model loads. Where
        the machine cannot honour them (``--trainer.accelerator gpu`` without one, more GPUs than it has, an
        accelerator whose package is not installed) the line says how many GPUs torch sees."""
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ModuleNotFoundError) as err:
            hint = ""
            if isinstance(err, ModuleNotFoundError) or DEVICE_WORDS.search(str(err)):
                gpus = torch.cuda.device_count()
                hint = (
                    f" (check --trainer.accelerator and --trainer.devices: torch sees {gpus} "
                    f"GPU{'' if gpus == 1 else 's'} here; docs/distributed.md)"
                )
            raise InputError(f"trainer: {err}{hint}") from err

    def _run_subcommand(self, subcommand: str) -> None:
        """The run; stopped by a signal, it says what it left in its folder and how to complete it (``stopped_by``)."""
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            stopped_by("SIGTERM", signal.SIGTERM, subcommand, self.model)
        except SystemExit:
            if INTERRUPTS:
                stopped_by("SIGINT", signal.SIGINT, subcommand, self.model)
            raise

    def before_instantiate_classes(self) -> None:
        """Paths given on the command line made absolute (those of config files already are: ``main``); one folder
        per run: with model.results_dir, the logger's events (and so config.yaml and hparams.yaml, which go to the
        logger's folder) go there too."""
        config = self.config[self.subcommand]
        absolute_namespace_paths(config, Path.cwd())
        if config.model.results_dir is not None and config.trainer.logger is not False:
            config.trainer.logger = logger_in(config.model.results_dir, config.trainer.logger)


def main(args: list[str] | None = None) -> TCubeCLI | None:
    """``test`` and ``predict`` through LightningCLI (``entry.main`` sends ``inspect`` to its own parser).

    Bad input (``InputError``) ends the run with its message and exit status 2, not a traceback. A run stopped by
    SIGTERM (a scheduler's preemption) exits 143 and by SIGINT (Ctrl+C) 130, each saying how to complete it:
    Lightning ends the first with a ``SystemExit`` that would say 0, the second with 1.
    """
    args = sys.argv[1:] if args is None else args
    quiet_lightning()
    INTERRUPTS.clear()

    def on_sigint(signum: int, frame: object) -> None:
        INTERRUPTS.append(signum)
        raise KeyboardInterrupt  # Lightning shuts the run down, then exits 1

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        return TCubeCLI(
            TCubeModule,
            EvaluationDataModule,
            args=inline_config_files(args, Path.cwd()),
            save_config_callback=RunFolder,
            parser_class=EvaluationParser,
            auto_configure_optimizers=False,  # it never trains: no --optimizer / --lr_scheduler
            seed_everything_default=0,  # the seed Lightning falls back to, without its "No seed found" warning
            # No abbreviated options: `--model.gamm 2` must be an error, not gamma = 2.
            parser_kwargs={
                "description": "T³ test-time merging of a generalist and an expert CLIP.",
                "allow_abbrev": False,
                "parser_mode": strict_yaml.MODE,  # a key given twice is an error, not silently the last
                **{name: subcommand_help(name) for name in SUBCOMMAND_HELP},
            },
        )
    except InputError as err:
        say_error(str(err))
        sys.exit(2)
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def stopped_by(name: str, number: int, subcommand: str, module: LightningModule) -> NoReturn:
    """Exit 128 + the signal's number, saying what the stopped run left in its folder and how to complete it: once,
    from rank 0 (a scheduler signals every process of a multi-GPU run, and their logs are often one)."""
    report = getattr(module, "report", None)  # the run's folder, once the run has started
    folder = report.results_dir if report else module.hparams.results_dir
    written = getattr(module, "results_written", False)
    if not written:
        left = "its first split: nothing was written; run it again"
    elif subcommand == "predict":  # predict cannot resume: each table is written whole
        left = (
            f"the last source; {folder}/predictions holds the tables of the sources finished so far, and no "
            f"predictions.json: run again with --model.overwrite true --model.results_dir {folder} to predict every "
            "source"
        )
    else:
        left = (
            f"the last split; {folder}/results.json holds the splits finished so far (its missing_splits names the "
            f"rest): run again with --model.resume true --model.results_dir {folder} to complete it"
        )
    if rank_zero_only.rank == 0:
        print(f"tcube-lightning: stopped by {name} before {left}", file=sys.stderr)
    sys.exit(128 + number)
