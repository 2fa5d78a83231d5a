"""The clustered methods' second pass (``t3_cluster``, ``dawin_cluster``, DaWin's recipe): pass 1 keeps every sample's
pretrained and expert logits and T³ weights; at the split's end a Beta mixture is fitted to the split's coefficients
(every process's), and each sample runs through the model merged at its component's mean, one merge per component.
Pass 1's pretrained and expert forwards are not repeated. Plain torch and data: the LightningModule reads the batches
again and puts what ``predict`` returns into its metrics and table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tcube_lightning.engine.torch_engine import BatchCoefficients, TCubeEngine
from tcube_lightning.evaluation.batches import GroupResult, class_set_groups, measured, probabilities
from tcube_lightning.merging.coefficients import fit_beta_mixture
from tcube_lightning.merging.methods import Method
from tcube_lightning.reporting.cost import CostMeter
from tcube_lightning.reporting.metrics import gather_from_all_ranks
from tcube_lightning.reporting.samples import prediction_columns


@dataclass(frozen=True)
class ClusterFit:
    """A split's fitted mixtures and what they give this process's samples."""

    weights: dict[str, torch.Tensor]
    """Method → the merge weight (its component's mean) of each of this process's samples, in pass 1's order."""
    index: torch.Tensor
    """Those samples' positions in the split, in the same order."""
    summaries: dict[str, dict]
    """Method → its mixture, for results.json."""
    notes: list[str]
    """Why a fit fell back to one merge per distinct value, per method, for the user."""


class ClusteredPass:
    """Pass 1's cache and pass 2 of the clustered methods, per split.

    Args:
        methods: The evaluated clustered methods, by name (none: nothing is kept).
        splits: The run's splits.
        settings: The T³ settings' labels (``""`` and ``model.grid``'s): each one's weights are kept.
        clusters: Components of each Beta mixture.
    """

    def __init__(self, methods: dict[str, Method], splits: list[str], settings: list[str], clusters: int) -> None:
        self.methods, self.clusters = methods, clusters
        self.keys = ("index", "pt", "ft", *settings)
        self.cache: dict[str, dict[str, list[torch.Tensor]]] = {s: {k: [] for k in self.keys} for s in splits}

    def keep(self, split: str, index: torch.Tensor, shared: BatchCoefficients, width: int) -> None:
        """A batch of pass 1 (or a mixed batch's group): what pass 2 needs of its samples. The logits of a mix's
        narrower class sets are padded with −inf to the split's ``width``: zero probability, so the coefficients
        (entropies, confidences) are those of each sample's own classes."""
        if self.methods:
            logits = (shared.pt_logits, shared.ft_logits[0])  # clustering is of one expert's coefficient
            pt, ft = (F.pad(x, (0, width - x.shape[1]), value=-math.inf) for x in logits)
            values = {"index": index, "pt": pt, "ft": ft, **{label: w[:, 0] for label, w in shared.weights.items()}}
            for key, value in values.items():
                self.cache[split][key].append(value.detach())

    def kept_any(self, split: str) -> bool:
        """Whether pass 1 kept any sample of ``split`` on this process."""
        return bool(self.cache[split]["index"])

    def keep_nothing(self, split: str, classes: int, device: torch.device) -> None:
        """A process that read no batch of ``split`` joins the gathers with empty, correctly shaped values."""
        for key, values in self.cache[split].items():
            shape = (0, classes) if key in ("pt", "ft") else (0,)
            values.append(torch.empty(shape, dtype=torch.long if key == "index" else torch.float32, device=device))

    def fit(self, split: str, rank: int) -> ClusterFit:
        """The mixtures of ``split`` (every process takes part in the gathers) and this process's (``rank``) samples'
        merge weights. The coefficients are computed over the split's samples in index order, the one-process order
        whatever the processes and the grouping of a mix's batches: vectorised kernels round a row by where it lies."""
        cache = {key: torch.cat(values) for key, values in self.cache.pop(split).items()}
        local_rows = gather_from_all_ranks(torch.tensor([len(cache["pt"])]))
        start = int(local_rows[:rank].sum())
        everything = {key: gather_from_all_ranks(values) for key, values in cache.items()}
        if not len(everything["index"]):  # predict: no image of the source could be read
            return ClusterFit({name: cache["index"].float() for name in self.methods}, cache["index"], {}, [])
        order = everything["index"].argsort()
        ordered = {key: values[order] for key, values in everything.items()}
        weights, summaries, notes = {}, {}, []
        for name, method in self.methods.items():
            in_index_order = method.coefficient(ordered["pt"], ordered["ft"], ordered[method.setting])
            coefficients = torch.empty_like(in_index_order)
            coefficients[order] = in_index_order
            mixture = fit_beta_mixture(coefficients, self.clusters)
            component = mixture.assign(coefficients[start : start + len(cache["pt"])]).to(cache["pt"].device)
            weights[name] = torch.tensor([float(m) for m in mixture.means], device=component.device)[component]
            summaries[name] = mixture.summary()
            if mixture.note:
                notes.append(f"split {split!r}, {name}: {mixture.note}")
        return ClusterFit(weights, cache["index"], summaries, notes)

    def predict(
        self,
        engine: TCubeEngine,
        batch: dict,
        class_sets: list[int],
        fit: ClusterFit,
        offset: int,
        meter: CostMeter | None = None,
    ) -> list[GroupResult]:
        """A batch pass 1 read, again (its rows from ``offset`` on in pass 1's order): every sample through the model
        merged at its component's mean, per group of one class set as in pass 1."""
        results = []
        for class_set, group in class_set_groups(class_sets, batch.get("source")):  # pass 1's order
            images, labels = batch["image"][group], batch["label"][group]
            local = slice(offset, offset + len(labels))
            columns, probs = {"index": fit.index[local]}, {}
            for name in self.methods:
                weights = fit.weights[name][local]
                with measured(meter, name, len(labels)):
                    logits = engine.grouped_logits(images, weights, class_set)
                probs[name] = probabilities(logits)
                columns |= {f"w/{name}": weights} | prediction_columns(name, probs[name])
            source = batch["source"][group] if "source" in batch else None
            results.append(GroupResult(class_set, labels, source, probs, columns))
            offset += len(labels)
        return results
