"""Library messages that a user of this tool cannot act on: Lightning's, silenced in every process that runs it (the
command line's, and the processes ddp_spawn starts, which import the module but not the command line), and open_clip's
note that a model it creates has random weights (ours get weights right after: loaded, or trained by the demo)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

NOT_ACTIONABLE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of an API torch 2.14 deprecates
    r"Total length of `list` across ranks is zero",  # a resumed run whose splits are all done: said by the module
    r"LightningCLI's args parameter is intended",  # main passes the command line on, its config files inlined
    r"predict returned None if it was on purpose",  # predict_step writes tables itself, it returns nothing
)


class DropMessages(logging.Filter):
    """Records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class DropTips(DropMessages):
    """Lightning's '💡 Tip' advertisements (litlogger, litmodels) on every run."""

    def __init__(self) -> None:
        super().__init__("💡 Tip")


@contextlib.contextmanager
def creating_empty_models() -> Iterator[None]:
    """open_clip warns (on the root logger) that the model it creates was initialised randomly, or that a schema
    folder has no weights: true of the empty model, which gets its weights loaded right after."""
    drop = DropMessages("No pretrained weights loaded", "Local config loaded, but no CLIP weights")
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def quiet_lightning() -> None:
    for pattern in NOT_ACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropTips) for f in logger.filters):
        logger.addFilter(DropTips())
