"""AdaMerging's adaptation inside a run: each adapted method learns its coefficients on a split's images before that
split is evaluated (or once, on ``adamerging.adapt_on``), and its merged model goes into the engine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from lightning import LightningDataModule
from lightning.pytorch.loggers import Logger
from torch.utils.data import Dataset

from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.errors import InputError
from tcube_lightning.evaluation.splits import one_class_set, split_sources
from tcube_lightning.merging.adamerging import AdaMergingSettings, adapt, batches, merged_flat
from tcube_lightning.merging.methods import Method
from tcube_lightning.reporting.cost import CostMeter
from tcube_lightning.reporting.logged import log_adaptation


def adaptation_split(adapt_on: str | None, data: LightningDataModule) -> tuple[str, Dataset, list[str]] | None:
    """Where AdaMerging adapts, checked before any model loads: ``adapt_on`` (a split of the run) as (split, its
    data, its class names), or None for each split on its own; either way with one class set, as AdaMerging's entropy
    is over one zero-shot head."""
    if adapt_on is None:
        why = "AdaMerging adapts on each split with one class set's zero-shot head (model.adamerging.adapt_on: one)"
        for split in data.split_names:
            one_class_set(split, split_sources(split, data), why)
        return None
    if adapt_on not in data.split_names:
        raise InputError(f"model.adamerging.adapt_on: {adapt_on!r} is not a split of this run: {data.split_names}")
    why = "model.adamerging.adapt_on: AdaMerging adapts with one class set's zero-shot head"
    return adapt_on, data.datasets[adapt_on], one_class_set(adapt_on, split_sources(adapt_on, data), why)


def adapt_methods(
    engine: TCubeEngine,
    methods: dict[str, Method],
    split: str,
    dataset: Dataset,
    class_set: int,
    settings: AdaMergingSettings,
    cost: CostMeter,
    logger: Logger | None,
    check: Callable[[], None],
) -> dict[str, dict]:
    """AdaMerging on ``dataset``'s images for every adapted method, classified by the generalist's head of
    ``class_set``, on ``settings.threads`` CPU threads: their merged models into the engine; what they learnt, for
    results.json and (``logger``, given on rank 0 only) TensorBoard. ``check`` runs before every step (``adapt``).
    Every process learns the same from the same images."""
    store, learnt = engine.store, {}
    with torch_threads(settings.threads):
        for name, method in methods.items():
            with cost.measure(name, len(dataset)):
                images = batches(dataset, settings.batch_size, settings.seed)
                layer_wise, head = method.adaptation == "layer", engine.pt_heads[class_set]
                experts = [store.expert_parameters(k) for k in range(store.count)]  # a LoRA expert's materialised
                names = engine.expert_names
                adaptation = adapt(store.pretrained, experts, head, images, layer_wise, settings, check, names)
                engine.set_adapted(name, merged_flat(store, adaptation))
            learnt[name] = adaptation.record()
            if logger is not None:
                log_adaptation(logger, split, name, adaptation)
    return learnt


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: left as they are) for the block, then given back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
