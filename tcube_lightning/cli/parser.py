"""The command line's parser: an error is one line with its cause (and, for an unknown option or config key, the
closest known ones), then where the help is; and the Trainer's options that only training uses are not offered,
since this tool only evaluates."""

from __future__ import annotations

import re
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from tcube_lightning.cli.commands import fail, long_options

TRAINING_ONLY = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "max_time",
    "limit_train_batches",
    "limit_val_batches",
    "overfit_batches",
    "val_check_interval",
    "check_val_every_n_epoch",
    "num_sanity_val_steps",
    "log_every_n_steps",
    "enable_checkpointing",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "detect_anomaly",
    "sync_batchnorm",
    "reload_dataloaders_every_n_epochs",
)
"""Trainer arguments that change nothing in an evaluation (epochs, optimisation, validation, checkpoints)."""
SUBCOMMAND_KEY = re.compile(r"\b(test|predict)\.([\w.]+)")
"""A subcommand's option as the top-level parser names it (``test.data.root``: ``main.py test`` without
``--data.root``), said as the option and with that subcommand's help."""


class EvaluationParser(LightningArgumentParser):
    """LightningCLI's parser with short errors (jsonargparse prints the whole usage before the message)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # parsing from Python (tests, tools): raise, as jsonargparse does
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        named = SUBCOMMAND_KEY.search(message)  # the top-level parser names a subcommand's missing options by key
        if parser is self and named:
            prog, message = f"{prog} {named.group(1)}", SUBCOMMAND_KEY.sub(r"--\2", message)
        fail(one_line(message), prog, known=long_options(parser))

    def add_trainer_arguments(self, trainer_class: type) -> None:
        """The Trainer's arguments less ``TRAINING_ONLY`` (LightningCLI instantiates the Trainer itself)."""
        self.add_class_arguments(
            trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=set(TRAINING_ONLY)
        )


def one_line(message: str, limit: int = 400) -> str:
    """jsonargparse's message on one line, its cause included: it names the key on the first line and says what was
    wrong on the next (``Parser key "model.lambda_weights": Expected a Literal[...]. Got value: foo``); long lists of
    what was accepted are cut at ``limit`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
