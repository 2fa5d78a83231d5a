"""Per-sample values of a split: kept batch by batch on each process, gathered at the split's end in the
one-process order. λ statistics, the decision quadrants, the analysis figures and the per-sample export read them.

Columns: ``index`` (the sample's position in the split), ``label``, ``finite`` (both models' logits finite),
``js``, ``lambda`` (and ``lambda[gamma=4]`` per ``model.grid`` setting), ``w/<method>`` (the expert weight a
dynamic method merged the sample with), ``pred/<method>`` and ``prob/<method>`` (predicted class and its
probability), ``flip`` (the models at λ_min and λ_max disagree); in a mixed split ``source`` (its source split's
position among the mix's sources) and ``source_index`` (its index there); at the split's end ``coverage/js`` and
``coverage/<method>`` (``deferral.coverage_columns``). The pretrained and expert models' predictions are
``pred/zeroshot`` and ``pred/expert``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tcube_lightning.engine.torch_engine import BatchCoefficients
from tcube_lightning.reporting.metrics import gather_objects

INDEX = "index"
EXPORT_ONLY = ("coverage/", "score/", "set_size/", "covered/", "accepted/", "set/")
"""Column prefixes kept only for the export: each sample's place in the deferral orders (results.json has their
summaries, and the figures recompute the orders from the predictions)."""


def lambda_column(setting: str) -> str:
    """λ's column for a T³ setting (``""``: the run's own)."""
    return f"lambda[{setting}]" if setting else "lambda"


def prediction_columns(method: str, probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """A method's predicted class and that class's probability, per sample."""
    top = probs.max(-1)
    return {f"pred/{method}": top.indices, f"prob/{method}": top.values}


def batch_columns(
    index: torch.Tensor,
    labels: torch.Tensor,
    shared: BatchCoefficients,
    weights: dict[str, torch.Tensor],
    experts: list[str],
) -> dict[str, torch.Tensor]:
    """A batch's columns from its shared forwards: index, label, finite, JS, λ per setting, each dynamic method's
    expert weight (``weights``, by method), and the models' own predictions. With several experts (``experts``, their
    names) ``js`` is the generalised JS of all of them with the generalist, and JS, λ and weights are per expert:
    ``js/<expert>``, ``lambda/<expert>``, ``w/<method>/<expert>``."""
    columns = {"index": index, "label": labels, "finite": shared.finite}
    for column, values in expert_columns(shared, weights, experts).items():
        columns[column] = values
    models = [("zeroshot", shared.pt_logits)] + [
        ("expert" if len(experts) == 1 else f"expert:{name}", logits)
        for name, logits in zip(experts, shared.ft_logits, strict=True)
    ]
    for name, logits in models:
        columns |= prediction_columns(name, logits.float().softmax(-1))
    return columns


def expert_columns(
    shared: BatchCoefficients, weights: dict[str, torch.Tensor], experts: list[str]
) -> dict[str, torch.Tensor]:
    """JS, λ per setting and each dynamic method's weights, as columns: one expert's by their plain names (``js``,
    ``lambda``, ``w/t3``), several experts' each with the expert's name after a slash."""
    if len(experts) == 1:
        columns = {"js": shared.js[:, 0]}
        columns |= {lambda_column(label): lam[:, 0] for label, lam in shared.lambdas.items()}
        return columns | {f"w/{name}": w[:, 0] if w.ndim == 2 else w for name, w in weights.items()}
    columns = {"js": shared.generalised_js}
    for k, expert in enumerate(experts):
        columns[f"js/{expert}"] = shared.js[:, k]
        columns |= {f"{lambda_column(label)}/{expert}": lam[:, k] for label, lam in shared.lambdas.items()}
        columns |= {f"w/{name}/{expert}": w[:, k] for name, w in weights.items()}
    return columns


def is_analysis_column(name: str) -> bool:
    """Kept for every run (analysis.npz); the others only in the export."""
    return not name.startswith(EXPORT_ONLY)


class SampleTable:
    """One split's per-sample columns on this process, gathered from every process at the split's end."""

    def __init__(self) -> None:
        self.parts: list[dict[str, torch.Tensor]] = []

    def add(self, columns: dict[str, torch.Tensor]) -> None:
        """A batch's columns, one value per sample each, with ``index``. A later pass may add further columns for
        samples already added (rows are matched by index). They stay on their device until the split ends: no
        copy to the host, and no synchronisation, per batch."""
        self.parts.append({name: values.detach() for name, values in columns.items()})

    def gather(self) -> dict[str, np.ndarray]:
        """Every process's rows as one table in the one-process order (by index). Every process must call it."""
        local = [{name: values.cpu() for name, values in part.items()} for part in self.parts]
        passes: dict[tuple[str, ...], list[dict]] = {}
        for part in (part for parts in gather_objects(local) for part in parts):
            passes.setdefault(tuple(sorted(part)), []).append(part)
        table: dict[str, np.ndarray] = {}
        for names, parts in passes.items():
            columns = {name: torch.cat([part[name] for part in parts]) for name in names}
            order = torch.argsort(columns[INDEX], stable=True)
            rows = {name: values[order].numpy() for name, values in columns.items()}
            if INDEX in table and not np.array_equal(table[INDEX], rows[INDEX]):
                raise RuntimeError("per-sample columns of one split cover different samples")
            table.update(rows)
        return dict(sorted(table.items(), key=lambda item: (item[0] != INDEX, item[0])))


def read_table(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file by name: one split's export (``samples/<split>.npz``), column by column."""
    with np.load(path) as arrays:
        return {name: arrays[name] for name in arrays.files}


def read_tables(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """An npz of split tables (keys ``split::column``), by split; empty if the file does not exist."""
    if not path.is_file():
        return {}
    tables: dict[str, dict[str, np.ndarray]] = {}
    for key, values in read_table(path).items():
        split, column = key.split("::", 1)
        tables.setdefault(split, {})[column] = values
    return tables


def flatten_tables(tables: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Split tables as the keys of one npz file, ``split::column`` (``read_tables`` reads them back)."""
    return {f"{split}::{column}": values for split, table in tables.items() for column, values in table.items()}
