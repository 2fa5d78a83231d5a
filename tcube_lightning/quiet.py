"""Lightning's messages that a user of this tool cannot act on, silenced in every process that runs it (the
command line's, and the processes ddp_spawn starts, which import the module but not the command line)."""

from __future__ import annotations

import logging
import warnings

NOT_ACTIONABLE_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's own use of an API torch 2.14 deprecates
    r"Total length of `list` across ranks is zero",  # a resumed run whose splits are all done: said by the module
)


class DropTips(logging.Filter):
    """Lightning's '💡 Tip' advertisements (litlogger, litmodels) on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def quiet_lightning() -> None:
    for pattern in NOT_ACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropTips) for f in logger.filters):
        logger.addFilter(DropTips())
