"""One batch of a split through every method, as a function of data: the shared pretrained and expert forwards with
JS and λ, every method's class probabilities and the batch's per-sample columns, returned to the caller (the
LightningModule puts them into its metrics, table and logger).

A batch of a mixed split may hold samples of several class sets. Its rows are evaluated in groups of one class set
each, every sample against its own zero-shot head (no padding changes a probability), and every group is the batch
to every method but the batch-wise ones: T³_B's coefficient is the mean over the whole batch, the average a clinic's
stream forces on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tcube_lightning.engine.torch_engine import BatchCoefficients, TCubeEngine
from tcube_lightning.merging.methods import Method
from tcube_lightning.reporting.cost import DIAGNOSTICS, SHARED, CostMeter
from tcube_lightning.reporting.samples import batch_columns, expert_columns, prediction_columns

Rows = slice | torch.Tensor
MIX_FIELDS = ("source", "source_index")
"""A mixed split's samples carry their source split (its position among the mix's sources) and their index there."""


@dataclass(frozen=True)
class GroupResult:
    """What one group of a batch's rows (one class set) gave: each method's class probabilities and the rows'
    per-sample columns (``samples.py``), prediction columns included."""

    class_set: int
    labels: torch.Tensor
    source: torch.Tensor | None
    """Each row's source split in a mix (None for a plain split)."""
    probabilities: dict[str, torch.Tensor]
    """Method → rows × classes, for the methods evaluated in this pass."""
    columns: dict[str, torch.Tensor]
    shared: BatchCoefficients | None = None
    """The group's shared forwards (None in the clustered second pass, which reuses pass 1's)."""


@dataclass(frozen=True)
class BatchResult:
    groups: list[GroupResult]
    """The batch's rows by class set, in class-set order (a plain split's batch: one group)."""
    logged: dict[str, torch.Tensor]
    """The whole batch's JS and λ per row (with several experts, each expert's T³ weight too), in row order: the
    per-batch values for the logger."""


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


def readable_rows(batch: dict) -> dict:
    """A batch without the rows that could not be read (predicting: ``readable`` says which)."""
    if "readable" not in batch:
        return batch
    return {field: values[batch["readable"]] for field, values in batch.items() if field != "readable"}


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """A method's class distribution per row, in float32 whatever the forwards' precision."""
    return logits.float().softmax(-1)


@contextlib.contextmanager
def measured(meter: CostMeter | None, part: str | None, images: int) -> Iterator[None]:
    """``meter.measure`` where a meter is given, else nothing."""
    with meter.measure(part, images) if meter is not None else contextlib.nullcontext():
        yield


@dataclass
class BatchEvaluation:
    """Every method on a batch, in plain torch: no Trainer, no module.

    Args:
        engine: The models, heads and merges (``TCubeEngine``), prepared.
        methods: The evaluated methods by name; the clustered ones are left to their second pass.
        weight_methods: The dynamic methods whose per-sample weights are kept (evaluated or not: the analysis).
        meter: Where each part's time goes (the module's ``CostMeter``); None measures nothing.
    """

    engine: TCubeEngine
    methods: dict[str, Method]
    weight_methods: dict[str, Method]
    meter: CostMeter | None = None

    def __call__(self, batch: dict, class_sets: list[int], index: torch.Tensor) -> BatchResult:
        """``batch``: ``image``, ``label`` and a mix's ``MIX_FIELDS``; ``class_sets``: its split's class set (a mix's:
        one per source); ``index``: each row's position in the split."""
        images, labels = batch["image"], batch["label"]
        with measured(self.meter, SHARED, len(labels)):
            groups = [
                (class_set, rows, self.engine.coefficients(images[rows], class_set))
                for class_set, rows in class_set_groups(class_sets, batch.get("source"))
            ]
        whole = {
            label: in_row_order([(rows, shared.weights[label]) for _, rows, shared in groups], len(labels))
            for label in self.engine.settings
        }
        results = []
        for class_set, rows, shared in groups:
            extras = {field: batch[field][rows] for field in MIX_FIELDS if field in batch}
            results.append(self._group(images[rows], labels[rows], index[rows], class_set, shared, whole, extras))
        names = self.engine.expert_names
        parts = [(rows, expert_columns(shared, {"t3": shared.weights[""]}, names)) for _, rows, shared in groups]
        kept = [c for c in parts[0][1] if c.startswith(("js", "lambda")) or len(names) > 1]
        logged = {c: in_row_order([(rows, part[c]) for rows, part in parts], len(labels)) for c in kept}
        return BatchResult(results, logged)

    def _group(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor,
        class_set: int,
        shared: BatchCoefficients,
        whole: dict[str, torch.Tensor],
        extras: dict[str, torch.Tensor],
    ) -> GroupResult:
        """Rows of one class set: every method but the clustered ones, with ``whole``, the whole batch's T³ weights
        per setting, for the batch-wise methods."""
        engine, count = self.engine, len(labels)
        contexts = {
            label: engine.context(images, shared, class_set, label, batch_weights=whole[label])
            for label in shared.weights
        }
        weights = {name: method.merge_weights(contexts[method.setting]) for name, method in self.weight_methods.items()}
        columns = batch_columns(index, labels, shared, weights, engine.expert_names) | extras
        probs = {}
        for name, method in self.methods.items():
            if not method.is_clustered:
                with measured(self.meter, name, count):
                    logits = method.logits(contexts[method.setting])
                probs[name] = probabilities(logits)
                columns |= prediction_columns(name, probs[name])
        with measured(self.meter, DIAGNOSTICS if engine.extreme_weights else None, count):
            extremes = engine.extreme_predictions(images, class_set)
        if extremes is not None:
            columns["flip"] = extremes[0] != extremes[1]
        return GroupResult(class_set, labels, extras.get("source"), probs, columns, shared)
