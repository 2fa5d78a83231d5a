"""The command line's parser: an error is one line with its cause (and, for an unknown option or config key, the
closest known ones), then where the help is; and the Trainer's options that only training uses are not offered,
since this tool only evaluates."""

from __future__ import annotations

import difflib
import re
import sys
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

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
UNKNOWN_NAMES = (r"--([\w.]+)", r'[Kk]ey "([\w.]+)"', r"option '([\w.]+)'")
"""Where jsonargparse's messages name an option or config key it does not know."""


class EvaluationParser(LightningArgumentParser):
    """LightningCLI's parser with short errors (jsonargparse prints the whole usage before the message)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # parsing from Python (tests, tools): raise, as jsonargparse does
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        cause = one_line(message)
        known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
        names = _unknown_names(message)
        close = [match for name in names for match in difflib.get_close_matches(f"--{name}", known, n=1)]
        hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"tcube-lightning: error: {cause}{hint}\nSee `{prog} --help` for the options.\n")
        sys.exit(2)

    def add_trainer_arguments(self, trainer_class: type) -> None:
        """The Trainer's arguments less ``TRAINING_ONLY`` (LightningCLI instantiates the Trainer itself)."""
        self.add_class_arguments(
            trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True, skip=set(TRAINING_ONLY)
        )


def _unknown_names(message: str) -> list[str]:
    """The option or config key names an error message says are unknown (without their values)."""
    if not re.search(r"[Uu]nrecognized|not expected|[Nn]o action|does not accept", message):
        return []
    return [name for pattern in UNKNOWN_NAMES for name in re.findall(pattern, message)]


def one_line(message: str, limit: int = 400) -> str:
    """jsonargparse's message on one line, its cause included: it names the key on the first line and says what was
    wrong on the next (``Parser key "model.lambda_weights": Expected a Literal[...]. Got value: foo``); long lists of
    what was accepted are cut at ``limit`` characters."""
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
