"""The calibration split (``data.calibration``): labelled samples that fix the deferral rules and conformal sets
before the evaluated splits are seen, and are not evaluated themselves. It is MedMNIST's own ``val`` split of the
modality, any labelled source (an npz, a Hugging Face dataset or an image folder under ``data.root``), or a seeded
fraction held out of one of the run's splits (``in_domain:0.2``), which is then evaluated on the rest."""

from __future__ import annotations

import re

import numpy as np
from torch.utils.data import Dataset

from tcube_lightning.errors import InputError

CALIBRATION = "calibration"
"""The calibration split's name among the run's: the first the loaders read, never a split of results.json."""
VAL = "val"


class Rows(Dataset):
    """Some rows of a reader, with their labels: a held-out fraction, or the rest of its split."""

    def __init__(self, base: Dataset, rows: np.ndarray) -> None:
        self.base, self.rows = base, np.asarray(rows)
        self.labels = np.asarray(base.labels)[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.base[int(self.rows[index])]


def held_out(spec: str) -> tuple[str, float] | None:
    """``split:fraction`` → (split, fraction); None for another form (``val``, a path)."""
    match = re.fullmatch(r"([^/:]+):(\d*\.?\d+)", spec)
    if match is None:
        return None
    fraction = float(match.group(2))
    if not 0 < fraction < 1:
        raise InputError(
            f"data.calibration: {spec!r} holds out {fraction} of {match.group(1)!r}; give a fraction 0 < f < 1"
        )
    return match.group(1), fraction


def split_rows(base: Dataset, fraction: float, seed: int, name: str) -> tuple[Rows, Rows]:
    """A seeded ``fraction`` of ``base``'s rows (the calibration split) and the rest (still evaluated), each in the
    reader's order; both must hold samples."""
    count = len(base)
    held = round(fraction * count)
    if held == 0 or held == count:
        raise InputError(
            f"data.calibration: {fraction} of split {name!r}'s {count} samples is {held}: calibration and evaluation "
            "each need some; give another fraction"
        )
    order = np.random.default_rng(seed).permutation(count)
    return Rows(base, np.sort(order[:held])), Rows(base, np.sort(order[held:]))
