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


PER_SAMPLE_STATES = (MulticlassAUROC, ExactCalibrationError, NegativeLogLikelihood)
"""Metrics that gather per-sample states: a process that read no batch of a split updates them with empty
tensors, so that every process takes part in the gather."""


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


class RunMetrics(nn.Module):
    """Every evaluated (split, method)'s metrics (``split_metrics``), updated batch by batch and reduced across
    processes when a split is computed.

    Args:
        splits: Split → (its class count, its labels).
        methods: The evaluated methods' names (none when predicting: no labels).
    """

    def __init__(self, splits: dict[str, tuple[int, object]], methods: list[str]) -> None:
        super().__init__()
        self.methods = list(methods)
        self.classes = {split: classes for split, (classes, _) in splits.items()}
        collections = {
            self._key(split, method): split_metrics(classes, labels)
            for split, (classes, labels) in splits.items()
            for method in self.methods
        }
        self.collections = nn.ModuleDict(collections)

    @staticmethod
    def _key(split: str, method: str) -> str:
        return f"{split}__{method}".replace(".", "_")  # ModuleDict keys may not hold dots

    def update(self, split: str, method: str, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.collections[self._key(split, method)].update(probs, labels)

    def join_without_samples(self, split: str, device: torch.device) -> None:
        """A process that read no batch of ``split`` joins the reductions with empty, correctly shaped states."""
        if split not in self.classes:  # no metrics of it (predicting)
            return
        no_probs = torch.empty(0, self.classes[split], device=device)
        no_labels = torch.empty(0, dtype=torch.long, device=device)
        for method in self.methods:  # counting metrics need nothing, the rest do
            for metric in self.collections[self._key(split, method)].values():
                if isinstance(metric, PER_SAMPLE_STATES):
                    metric.update(no_probs, no_labels)

    def compute(self, split: str) -> dict[str, dict[str, float]]:
        """The split's metrics by method, reduced over every process (every process must call it)."""
        return {
            method: {name: float(value) for name, value in self.collections[self._key(split, method)].compute().items()}
            for method in self.methods
        }
