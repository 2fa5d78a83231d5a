"""AdaMerging's adaptation inside a run: each adapted method learns its coefficients on a split's images before that
split is evaluated (or once, on ``adamerging.adapt_on``), and its merged model goes into the engine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import Dataset

from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.merging.adamerging import AdaMergingSettings, adapt, batches, merged_flat
from tcube_lightning.merging.methods import Method
from tcube_lightning.reporting.cost import CostMeter
from tcube_lightning.reporting.report import log_adaptation


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
                adaptation = adapt(store.pretrained, store.expert, head, images, layer_wise, settings, check)
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
