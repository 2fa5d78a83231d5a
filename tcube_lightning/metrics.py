"""Per-split metrics (torchmetrics, reduced across processes in ``compute``) and the one gather the
clustered methods need beyond them."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC


def gather_from_all_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``values`` concatenated in rank order (the tensor itself without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def split_metrics(num_classes: int, labels) -> MetricCollection:  # noqa: ANN001 - array-like
    """Top-1, balanced accuracy (macro recall) and, where every class occurs in the split, macro AUC."""
    metrics = {
        "top1": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "balanced_accuracy": MulticlassAccuracy(num_classes=num_classes, average="macro"),
    }
    if len(set(int(v) for v in labels)) == num_classes:
        metrics["auc"] = MulticlassAUROC(num_classes=num_classes, average="macro")
    return MetricCollection(metrics)
