"""Per-split metrics (torchmetrics, reduced across processes in ``compute``) and the one gather the
clustered methods need beyond them."""

from __future__ import annotations

import math

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

    def __init__(self) -> None:
        super().__init__()
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


def split_metrics(num_classes: int, labels) -> MetricCollection:
    """Top-1, balanced accuracy (macro recall), calibration (ECE, 15 bins, L1; negative log-likelihood) and,
    where every class occurs in the split, macro AUC."""
    metrics = {
        "top1": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "balanced_accuracy": MulticlassAccuracy(num_classes=num_classes, average="macro"),
        "ece": ExactCalibrationError(num_classes=num_classes, n_bins=15, norm="l1"),
        "nll": NegativeLogLikelihood(),
    }
    if len({int(v) for v in labels}) == num_classes:
        metrics["auc"] = MulticlassAUROC(num_classes=num_classes, average="macro")
    return MetricCollection(metrics)


class ClassAgnosticMetrics(Metric):
    """A mixed split's metrics over samples of several class sets, each scored in its own: top-1, expected
    calibration error (the top probability against correctness, 15 bins, L1, as ``ExactCalibrationError``) and negative
    log-likelihood, each from every sample's values in a canonical order (1 and N processes give the same bits)."""

    full_state_update = False

    def __init__(self, bins: int = 15) -> None:
        super().__init__()
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


PER_SAMPLE_STATES = (MulticlassAUROC, ExactCalibrationError, NegativeLogLikelihood, ClassAgnosticMetrics)
"""Metrics that gather per-sample states: a process that read no batch of a split updates them with empty
tensors, so that every process takes part in the gather."""


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
        self.classes: dict[str, int] = {}
        collections = {}
        for split, sources in splits.items():
            for method in self.methods:
                if sources[0][0] is not None:  # a mix: over every sample, and per source
                    collections[self._key(split, method)] = ClassAgnosticMetrics()
                    self.classes[self._key(split, method)] = max(classes for _, classes, _ in sources)
                for source, classes, labels in sources:
                    collections[self._key(split, method, source)] = split_metrics(classes, labels)
                    self.classes[self._key(split, method, source)] = classes
        self.collections = nn.ModuleDict(collections)
        self.updated: set[str] = set()
        """The collections this process updated: the others join each reduction with empty states."""

    @staticmethod
    def _key(split: str, method: str, source: str | None = None) -> str:
        key = f"{split}__{method}" + (f"__{source}" if source is not None else "")
        return key.replace(".", "_")  # ModuleDict keys may not hold dots

    def update(
        self, split: str, method: str, probs: torch.Tensor, labels: torch.Tensor, source: torch.Tensor | None = None
    ) -> None:
        """A batch's (or a mixed batch's group's) probabilities; ``source``: each row's source, in a mixed split."""
        if source is None:
            self._update(self._key(split, method), probs, labels)
            return
        self._update(self._key(split, method), probs, labels)
        for index in torch.unique(source).tolist():
            rows = source == index
            self._update(self._key(split, method, self.sources[split][index]), probs[rows], labels[rows])

    def _update(self, key: str, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.collections[key].update(probs, labels)
        self.updated.add(key)

    def join_without_samples(self, split: str, device: torch.device) -> None:
        """Every collection of ``split`` this process got no sample of joins the reductions with empty, correctly
        shaped states (counting metrics need nothing, the per-sample ones do)."""
        for method in self.methods:
            for key in {self._key(split, method), *(self._key(split, method, s) for s in self.sources.get(split, ()))}:
                if key in self.collections and key not in self.updated:
                    empty = torch.empty(0, self.classes[key], device=device)
                    collection = self.collections[key]
                    metrics = collection.values() if isinstance(collection, MetricCollection) else [collection]
                    for metric in metrics:
                        if isinstance(metric, PER_SAMPLE_STATES):
                            metric.update(empty, torch.empty(0, dtype=torch.long, device=device))

    def compute(self, split: str) -> dict[str, dict[str, float]]:
        """The split's metrics by method, reduced over every process (every process must call it)."""
        return {method: self._compute(self._key(split, method)) for method in self.methods}

    def compute_sources(self, split: str) -> dict[str, dict[str, dict[str, float]]]:
        """A mixed split's metrics per source split, by method (every process must call it); empty for a plain one."""
        if self.sources.get(split, [None])[0] is None:
            return {}
        return {
            source: {method: self._compute(self._key(split, method, source)) for method in self.methods}
            for source in self.sources[split]
        }

    def _compute(self, key: str) -> dict[str, float]:
        return {name: float(value) for name, value in self.collections[key].compute().items()}
