"""One batch of a split through every method: the shared pretrained and expert forwards with JS and λ, each method's
logits into the metrics, and the batch's per-sample columns into the split's table.

A batch of a mixed split may hold samples of several class sets. Its rows are evaluated in groups of one class set
each, every sample against its own zero-shot head (no padding changes a probability), and every group is the batch
to every method but the batch-wise ones: T³_B's coefficient is the mean over the whole batch, the average a clinic's
stream forces on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tcube_lightning.engine.torch_engine import BatchCoefficients
from tcube_lightning.reporting.cost import DIAGNOSTICS, SHARED
from tcube_lightning.reporting.report import log_batch_coefficients
from tcube_lightning.reporting.samples import batch_columns, expert_columns

if TYPE_CHECKING:
    from tcube_lightning.evaluation.module import TCubeModule

Rows = slice | torch.Tensor
MIX_FIELDS = ("source", "source_index")
"""A mixed split's samples carry their source split (its position among the mix's sources) and their index there."""


def class_set_groups(class_sets: list[int], source: torch.Tensor | None) -> list[tuple[int, Rows]]:
    """The batch's rows by class set, in class-set order: every row of a plain split's batch (``source`` None: its one
    class set), or a mixed batch's rows grouped by their source's class set (``class_sets``: each source's)."""
    if source is None or len(set(class_sets)) == 1:
        return [(class_sets[0], slice(None))]
    per_row = torch.tensor(class_sets, device=source.device)[source]
    return [(c, (per_row == c).nonzero().squeeze(1)) for c in sorted(set(per_row.tolist()))]


def in_row_order(parts: list[tuple[Rows, torch.Tensor]], rows: int) -> torch.Tensor:
    """Values computed per group, back in the batch's row order."""
    if len(parts) == 1:
        return parts[0][1]
    ordered = parts[0][1].new_empty(rows, *parts[0][1].shape[1:])
    for where, values in parts:
        ordered[where] = values
    return ordered


def evaluate_batch(module: TCubeModule, split: str, batch: dict) -> None:
    """Every method on ``batch`` (images, labels, and a mixed split's ``MIX_FIELDS``), into the metrics and table."""
    images, labels = batch["image"], batch["label"]
    step, index = module.batch_position(split, labels)
    with module.cost.measure(SHARED, len(labels)):
        groups = [
            (class_set, rows, module.engine.coefficients(images[rows], class_set))
            for class_set, rows in class_set_groups(module.class_sets[split], batch.get("source"))
        ]
    whole = {
        label: in_row_order([(rows, shared.weights[label]) for _, rows, shared in groups], len(labels))
        for label in module.engine.settings
    }
    for class_set, rows, shared in groups:
        extras = {field: batch[field][rows] for field in MIX_FIELDS if field in batch}
        evaluate_group(module, split, images[rows], labels[rows], index[rows], class_set, shared, whole, extras)
    if module.logger is not None:  # JS and λ of the whole batch; with several experts each one's T³ weight too
        names = module.engine.expert_names
        parts = [(rows, expert_columns(shared, {"t3": shared.weights[""]}, names)) for _, rows, shared in groups]
        logged = [c for c in parts[0][1] if c.startswith(("js", "lambda")) or len(names) > 1]
        scalars = {c: in_row_order([(rows, part[c]) for rows, part in parts], len(labels)) for c in logged}
        log_batch_coefficients(module.logger, split, step, scalars, module.trainer.is_global_zero)


def evaluate_group(
    module: TCubeModule,
    split: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor,
    class_set: int,
    shared: BatchCoefficients,
    whole: dict[str, torch.Tensor],
    extras: dict[str, torch.Tensor],
) -> None:
    """Rows of one class set: every method but the clustered ones (they predict in a second pass), with ``whole``, the
    whole batch's T³ weights per setting, for the batch-wise methods."""
    engine, count = module.engine, len(labels)
    contexts = {
        label: engine.context(images, shared, class_set, label, batch_weights=whole[label]) for label in shared.weights
    }
    weights = {name: method.merge_weights(contexts[method.setting]) for name, method in module.weight_methods.items()}
    columns = batch_columns(index, labels, shared, weights, engine.expert_names) | extras
    for name, method in module.methods.items():
        if not method.is_clustered:
            with module.cost.measure(name, count):
                logits = method.logits(contexts[method.setting])
            columns |= module.update_metrics(split, name, logits, labels, extras.get("source"))
    module.clustered.keep(split, index, shared, module.widths[split])
    with module.cost.measure(DIAGNOSTICS if engine.extreme_weights else None, count):
        extremes = engine.extreme_predictions(images, class_set)
    if extremes is not None:
        columns["flip"] = extremes[0] != extremes[1]
    module.tables[split].add(columns)
