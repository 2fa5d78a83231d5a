"""Per-split metrics (torchmetrics, reduced across processes in ``compute``) and the one gather the
clustered methods need beyond them."""

from __future__ import annotations

import math

import torch
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
