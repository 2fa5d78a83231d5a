"""Where a split's samples come from: the split itself, or a mix's source splits (``data.mixing``), each with its
class names and labels: what the class sets, heads, metrics and records of the run are built from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from lightning import LightningDataModule

from tcube_lightning.data.mixing import MixedSplit
from tcube_lightning.errors import InputError


@dataclass(frozen=True)
class SplitSource:
    name: str | None
    """The source split in a mix; None for a plain split's own samples."""
    classnames: list[str]
    labels: np.ndarray | None
    """None for ``predict``'s unlabelled sources."""


def split_sources(split: str, data: LightningDataModule) -> list[SplitSource]:
    dataset = data.datasets[split]
    if isinstance(dataset, MixedSplit):
        return [
            SplitSource(*fields)
            for fields in zip(dataset.source_names, dataset.source_classnames, dataset.source_labels, strict=True)
        ]
    return [SplitSource(None, list(data.split_classnames[split]), getattr(dataset.base, "labels", None))]


def mixed_or_plain(sources: list[SplitSource]) -> list[str] | dict[str, list[str]]:
    """A split's class names as results.json records them: its list, or a mix's per source split."""
    if sources[0].name is None:
        return sources[0].classnames
    return {source.name: source.classnames for source in sources}


def one_class_set(split: str, sources: list[SplitSource], why: str) -> list[str]:
    """The class names of a split whose samples must share one class set (``why``), or an error naming the split."""
    sets = list(dict.fromkeys(tuple(source.classnames) for source in sources))
    if len(sets) > 1:
        raise InputError(f"{why}: the mix {split!r} holds samples of {len(sets)} class sets {[list(s) for s in sets]}")
    return list(sets[0])


def class_sets(
    sources: dict[str, list[SplitSource]], extra: list[str] | None = None
) -> tuple[list[tuple[str, ...]], dict[str, list[int]]]:
    """The run's distinct class sets (one prompt set and zero-shot head each), in order of first use, ``extra`` (a
    set needed besides the splits': AdaMerging's ``adapt_on``) last if new; and per split its sources' sets: one for
    a plain split, one per source split for a mix."""
    used = [tuple(source.classnames) for split in sources.values() for source in split]
    sets = list(dict.fromkeys([*used, *([tuple(extra)] if extra is not None else [])]))
    return sets, {s: [sets.index(tuple(x.classnames)) for x in split] for s, split in sources.items()}
