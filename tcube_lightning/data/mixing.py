"""Mixed splits: the stream a clinic sees, where clean, degraded and other cases arrive together. ``data.mixes`` maps a
new split's name to the run's splits it mixes (names, or shell patterns: ``*@*`` is every corrupted split); their
samples are shuffled once, seeded, into one split, and every sample keeps its source split, its index there and its
class set (its labels and zero-shot head are its source's)."""

from __future__ import annotations

import fnmatch

import numpy as np
from torch.utils.data import Dataset

from tcube_lightning.errors import InputError


class MixedSplit(Dataset):
    """Several splits' samples in one seeded shuffle, read lazily from their own datasets.

    Args:
        sources: Each source split's name → its dataset (samples as dicts with ``image`` and ``label``).
        classnames: Each source split's class names.
        seed: The shuffle's seed (``data.seed``).
    """

    def __init__(self, sources: dict[str, Dataset], classnames: dict[str, list[str]], seed: int) -> None:
        self.source_names = list(sources)
        self.datasets = [sources[name] for name in self.source_names]
        self.source_classnames = [list(classnames[name]) for name in self.source_names]
        self.source_labels = [np.asarray(dataset.base.labels) for dataset in self.datasets]
        sizes = [len(dataset) for dataset in self.datasets]
        owner = np.repeat(np.arange(len(sizes)), sizes)
        within = np.concatenate([np.arange(size) for size in sizes])
        order = np.random.default_rng(seed).permutation(len(owner))
        self.source, self.source_index = owner[order], within[order]
        """Each sample's source (its position in ``source_names``) and its index in that source, in mix order."""

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        source, within = int(self.source[index]), int(self.source_index[index])
        return {**self.datasets[source][within], "source": source, "source_index": within}


def mix_members(name: str, entries: list[str], splits: list[str], mixes: dict) -> list[str]:
    """The splits a mix names, in the run's order: each entry a split's name or a shell pattern over them; an empty
    list, a name or pattern that names no split, and a mix among them are errors naming the mix."""
    if not entries:
        raise InputError(f"data.mixes.{name}: an empty list; name the run's splits to mix (e.g. [in_domain, '*@*'])")
    members = []
    for entry in entries:
        if entry in mixes:
            raise InputError(
                f"data.mixes.{name}: {entry!r} is a mix itself; a mix draws on the run's splits: list those instead"
            )
        matched = [split for split in splits if fnmatch.fnmatchcase(split, entry)]
        if not matched:
            raise InputError(f"data.mixes.{name}: {entry!r} names no split of the run; its splits: {splits}")
        members += matched
    mixed = [split for split in splits if split in members]
    if len(mixed) == 1:
        raise InputError(
            f"data.mixes.{name}: mixes one split only ({mixed[0]!r}), which the run evaluates already; a mix needs two "
            "or more splits"
        )
    return mixed


def build_mixes(
    mixes: dict[str, list[str]], datasets: dict[str, Dataset], classnames: dict[str, list[str]], seed: int
) -> dict[str, MixedSplit]:
    """Every mix of ``data.mixes`` over the run's splits (``datasets``), checked before any model loads."""
    built = {}
    for name, entries in mixes.items():
        if name in datasets:
            raise InputError(f"data.mixes: {name!r} is already a split of the run; give the mix a name of its own")
        members = mix_members(name, list(entries or []), list(datasets), mixes)
        built[name] = MixedSplit({m: datasets[m] for m in members}, {m: classnames[m] for m in members}, seed)
    return built


def domain_experts(expert_of: dict[str, str], splits: list[str]) -> dict[str, str]:
    """Each split's domain expert from ``data.expert_of`` (split names or shell patterns → expert): a split's own name
    wins over any pattern, and among patterns the first that matches; an entry that matches no split is an error
    naming it."""
    experts = {split: expert for split, expert in expert_of.items() if split in splits}
    for entry, expert in expert_of.items():
        matched = [split for split in splits if fnmatch.fnmatchcase(split, entry)]
        if not matched:
            raise InputError(f"data.expert_of: {entry!r} names no split of the run; its splits: {splits}")
        for split in matched:
            experts.setdefault(split, expert)
    return {split: experts[split] for split in splits if split in experts}
