"""Per-split metrics (torchmetrics, every metric of a split reduced across processes in one gather) and the gathers
the per-sample tables and the clustered methods need beyond them."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassCalibrationError
from torchmetrics.functional.classification.calibration_error import _ce_compute
from torchmetrics.utilities import dim_zero_cat


class ExactCalibrationError(MulticlassCalibrationError):
    """torchmetrics' multiclass expected calibration error, computed from the gathered samples in a canonical
    order (sorted by confidence, then correctness): its sums then do not depend on how the samples were spread
    over processes, so 1 and N processes give the same value to the bit."""

    def compute(self) -> torch.Tensor:
        confidences, accuracies = dim_zero_cat(self.confidences), dim_zero_cat(self.accuracies)
        order = torch.sort(accuracies, stable=True).indices
        order = order[torch.sort(confidences[order], stable=True).indices]
        return _ce_compute(confidences[order], accuracies[order], self.n_bins, norm=self.norm)


class NegativeLogLikelihood(Metric):
    """Mean −log p(true class) over the split, from every sample's value summed exactly (``math.fsum``). A
    probability that underflowed to 0 in float32 counts as float32's smallest normal number (−log ≈ 87.3)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        true_class = probs.gather(-1, labels.long()[:, None]).squeeze(-1)
        self.values.append(-true_class.clamp_min(torch.finfo(torch.float32).tiny).double().log())

    def compute(self) -> torch.Tensor:
        values = dim_zero_cat(self.values).tolist()
        return torch.tensor(math.fsum(values) / len(values) if values else math.nan, dtype=torch.float64)


def gather_objects(value: object) -> list:
    """Every process's ``value``, in rank order (``[value]`` without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, value)
    return parts


def gather_from_all_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``values`` concatenated in rank order (the tensor itself without DDP)."""
    return torch.cat(gather_objects(values.cpu())).to(values.device)


REDUCED_BY_RUN_METRICS = {"sync_on_compute": False}
"""Each metric's ``compute`` keeps to its own states: ``RunMetrics`` reduces them across processes beforehand."""


def split_metrics(num_classes: int, labels) -> MetricCollection:
    """Top-1, balanced accuracy (macro recall), calibration (ECE, 15 bins, L1; negative log-likelihood) and,
    where every class occurs in the split, macro AUC."""
    metrics = {
        "top1": MulticlassAccuracy(num_classes=num_classes, average="micro", **REDUCED_BY_RUN_METRICS),
        "balanced_accuracy": MulticlassAccuracy(num_classes=num_classes, average="macro", **REDUCED_BY_RUN_METRICS),
        "ece": ExactCalibrationError(num_classes=num_classes, n_bins=15, norm="l1", **REDUCED_BY_RUN_METRICS),
        "nll": NegativeLogLikelihood(**REDUCED_BY_RUN_METRICS),
    }
    if len({int(v) for v in labels}) == num_classes:
        metrics["auc"] = MulticlassAUROC(num_classes=num_classes, average="macro", **REDUCED_BY_RUN_METRICS)
    return MetricCollection(metrics)


class ClassAgnosticMetrics(Metric):
    """A mixed split's metrics over samples of several class sets, each scored in its own: top-1, expected
    calibration error (the top probability against correctness, 15 bins, L1, as ``ExactCalibrationError``) and negative
    log-likelihood, each from every sample's values in a canonical order (1 and N processes give the same bits)."""

    full_state_update = False

    def __init__(self, bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins = bins
        for name in ("confidences", "correct", "nll"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        top = probs.max(-1)
        self.confidences.append(top.values.float())
        self.correct.append((top.indices == labels).float())
        true_class = probs.gather(-1, labels.long()[:, None]).squeeze(-1)
        self.nll.append(-true_class.clamp_min(torch.finfo(torch.float32).tiny).double().log())

    def compute(self) -> dict[str, torch.Tensor]:
        confidences, correct = dim_zero_cat(self.confidences), dim_zero_cat(self.correct)
        order = torch.sort(correct, stable=True).indices
        order = order[torch.sort(confidences[order], stable=True).indices]
        ece = _ce_compute(confidences[order], correct[order], self.bins, norm="l1")
        count = len(correct)
        return {
            "top1": torch.tensor(math.fsum(correct.tolist()) / count if count else math.nan, dtype=torch.float64),
            "ece": ece,
            "nll": torch.tensor(math.fsum(dim_zero_cat(self.nll).tolist()) / count if count else math.nan),
        }


class RunMetrics(nn.Module):
    """Every evaluated (split, method)'s metrics, updated batch by batch and reduced across processes when a split is
    computed: ``split_metrics`` of the split's classes; for a mixed split, ``ClassAgnosticMetrics`` over it and
    ``split_metrics`` of each source split's samples in it.

    Args:
        splits: Split → its sources: (source split, or None for the split itself; class count; labels).
        methods: The evaluated methods' names (none when predicting: no labels).
    """

    def __init__(self, splits: dict[str, list[tuple[str | None, int, object]]], methods: list[str]) -> None:
        super().__init__()
        self.methods = list(methods)
        self.sources = {split: [name for name, _, _ in sources] for split, sources in splits.items()}
        collections = {}
        for split, sources in splits.items():
            for method in self.methods:
                if sources[0][0] is not None:  # a mix: over every sample, and per source
                    collections[self._key(split, method)] = ClassAgnosticMetrics(**REDUCED_BY_RUN_METRICS)
                for source, classes, labels in sources:
                    collections[self._key(split, method, source)] = split_metrics(classes, labels)
        self.collections = nn.ModuleDict(collections)

    @staticmethod
    def _key(split: str, method: str, source: str | None = None) -> str:
        key = f"{split}__{method}" + (f"__{source}" if source is not None else "")
        return key.replace(".", "_")  # ModuleDict keys may not hold dots

    def update(
        self, split: str, method: str, probs: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> None:
        """A batch's (or a mixed batch's group's) probabilities; ``source``: each row's source, in a mixed split."""
        self.collections[self._key(split, method)].update(probs, labels)
        for index in [] if source is None else torch.unique(source).tolist():
            rows = source == index
            self.collections[self._key(split, method, self.sources[split][index])].update(probs[rows], labels[rows])

    def compute(self, split: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
        """The split's metrics by method and, for a mixed split, by source split and method (empty for a plain one),
        reduced over every process. Every process must call it, once per split."""
        mixed_sources = [] if self.sources[split][0] is None else self.sources[split]
        keys = {method: self._key(split, method) for method in self.methods}
        source_keys = {source: {m: self._key(split, m, source) for m in self.methods} for source in mixed_sources}
        self._reduce([*keys.values(), *(key for per_method in source_keys.values() for key in per_method.values())])
        by_source = {
            source: {m: self._compute(key) for m, key in per_method.items()}
            for source, per_method in source_keys.items()
        }
        return {method: self._compute(key) for method, key in keys.items()}, by_source

    def _reduce(self, keys: list[str]) -> None:
        """Every process's states of these collections, in rank order, into this process's, in one gather:
        torchmetrics would gather each state of each metric on its own, thousands of collectives a run. As its "cat"
        and "sum" reductions (the only ones here): list states (per-sample values) joined, tensor states (counts)
        summed. A process without samples of a collection contributes its empty or zero states."""
        metrics = [metric for key in keys for metric in self._metrics(key)]
        local = [{name: _to_cpu(value) for name, value in metric.metric_state.items()} for metric in metrics]
        parts = gather_objects(local)
        if len(parts) == 1:
            return
        for position, metric in enumerate(metrics):
            for name, value in metric.metric_state.items():
                states = [part[position][name] for part in parts]
                if isinstance(value, list):
                    merged = [tensor.to(metric.device) for state in states for tensor in state]
                else:
                    merged = torch.stack(states).sum(0).to(metric.device)
                setattr(metric, name, merged)

    def _metrics(self, key: str) -> list[Metric]:
        collection = self.collections[key]
        return list(collection.values(copy_state=False)) if isinstance(collection, MetricCollection) else [collection]

    def _compute(self, key: str) -> dict[str, float]:
        with warnings.catch_warnings():  # a process that read none of its samples holds the others' states now
            warnings.filterwarnings("ignore", "The ``compute`` method of metric", UserWarning)
            return {name: float(value) for name, value in self.collections[key].compute().items()}


def _to_cpu(state: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A state as sent to the other processes: on the host (a pickled CUDA tensor would load on its sender's device)."""
    return [tensor.cpu() for tensor in state] if isinstance(state, list) else state.cpu()
