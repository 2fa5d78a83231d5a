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
    templates: tuple[str, ...]
    """The prompt templates of its class names."""

    @property
    def class_set(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What one zero-shot head serves: the class names and their templates."""
        return tuple(self.classnames), self.templates


def split_sources(split: str, data: LightningDataModule) -> list[SplitSource]:
    dataset = data.datasets[split]
    if isinstance(dataset, MixedSplit):
        fields = zip(dataset.source_names, dataset.source_classnames, dataset.source_labels, strict=True)
        return [SplitSource(name, names, labels, tuple(data.templates_of(name))) for name, names, labels in fields]
    labels = getattr(dataset.base, "labels", None)
    return [SplitSource(None, list(data.split_classnames[split]), labels, tuple(data.templates_of(split)))]


def mixed_or_plain(sources: list[SplitSource]) -> list[str] | dict[str, list[str]]:
    """A split's class names as results.json records them: its list, or a mix's per source split."""
    if sources[0].name is None:
        return sources[0].classnames
    return {source.name: source.classnames for source in sources}


def one_class_set(split: str, sources: list[SplitSource], why: str) -> ClassSet:
    """The class set of a split whose samples must share one (``why``), or an error naming the split."""
    sets = list(dict.fromkeys(source.class_set for source in sources))
    if len(sets) > 1:
        names = [list(names) for names, _ in sets]
        raise InputError(f"{why}: the mix {split!r} holds samples of {len(sets)} class sets {names}")
    return sets[0]


ClassSet = tuple[tuple[str, ...], tuple[str, ...]]
"""Class names and their prompt templates: one zero-shot head."""


def class_sets(
    sources: dict[str, list[SplitSource]], extra: ClassSet | None = None
) -> tuple[list[ClassSet], dict[str, list[int]]]:
    """The run's distinct class sets (one prompt set and zero-shot head each), in order of first use, ``extra`` (a
    set needed besides the splits': AdaMerging's ``adapt_on``) last if new; and per split its sources' sets: one for
    a plain split, one per source split for a mix."""
    used = [source.class_set for split in sources.values() for source in split]
    sets = list(dict.fromkeys([*used, *([extra] if extra is not None else [])]))
    return sets, {s: [sets.index(x.class_set) for x in split] for s, split in sources.items()}
