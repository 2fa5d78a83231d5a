"""The clustered methods' second pass (``t3_cluster``, ``dawin_cluster``, DaWin's recipe): pass 1 keeps every sample's
pretrained and expert logits and T³ weights; at the split's end a Beta mixture is fitted to the split's coefficients
(every process's), and each sample runs through the model merged at its component's mean, one merge per component.
Pass 1's pretrained and expert forwards are not repeated."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from tcube_lightning.engine.torch_engine import BatchCoefficients
from tcube_lightning.evaluation.batches import class_set_groups
from tcube_lightning.merging.coefficients import fit_beta_mixture
from tcube_lightning.merging.methods import Method
from tcube_lightning.reporting.metrics import gather_from_all_ranks
from tcube_lightning.reporting.report import mixture_summary

if TYPE_CHECKING:
    from tcube_lightning.evaluation.module import TCubeModule


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
        self.summaries: dict[str, dict[str, dict]] = {s: {} for s in splits}
        """Each split's fitted mixtures, by method, for results.json."""

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

    def keep_nothing(self, split: str, classes: int, device: torch.device) -> None:
        """A process that read no batch of ``split`` joins the gathers with empty, correctly shaped values."""
        for key, values in self.cache[split].items():
            shape = (0, classes) if key in ("pt", "ft") else (0,)
            values.append(torch.empty(shape, dtype=torch.long if key == "index" else torch.float32, device=device))

    def run(self, module: TCubeModule, index: int) -> None:
        """Pass 2 on split ``index``: fit the mixtures (every process takes part), then predict the local samples."""
        split = module.split_names[index]
        cache = {key: torch.cat(values) for key, values in self.cache[split].items()}
        local_rows = gather_from_all_ranks(torch.tensor([len(cache["pt"])]))
        start = int(local_rows[: module.global_rank].sum())
        everything = {key: gather_from_all_ranks(values) for key, values in cache.items()}
        assignments, means = {}, {}
        for name, method in self.methods.items():
            coefficients = method.coefficient(everything["pt"], everything["ft"], everything[method.setting])
            mixture = fit_beta_mixture(coefficients, self.clusters)
            assignments[name] = mixture.assign(coefficients[start : start + len(cache["pt"])]).to(module.device)
            means[name] = torch.tensor([float(m) for m in mixture.means], device=module.device)
            self.summaries[split][name] = mixture_summary(mixture)
            if mixture.note:
                rank_zero_warn(f"split {split!r}, {name}: {mixture.note}")
        # Under the trainer's precision (e.g. bf16 autocast), like test_step: this pass may run from an epoch hook.
        with module.trainer.precision_plugin.test_step_context():
            self._predict(module, index, assignments, means, cache["index"])

    def _predict(self, module: TCubeModule, index: int, assignments: dict, means: dict, rows: torch.Tensor) -> None:
        """Every local sample through the model merged at its component's mean, into the metrics and the table."""
        split = module.split_names[index]
        trainer, offset = module.trainer, 0
        loaders = trainer.predict_dataloaders if module.predicting else trainer.test_dataloaders
        # Only the batches pass 1 read: Lightning's limit_test_batches / fast_dev_run stop it early.
        for batch in itertools.islice(loaders[index], module.batches_seen[split]):
            batch = module.readable(module.transfer_batch_to_device(batch, module.device, index))
            groups = class_set_groups(module.class_sets[split], batch.get("source"))  # pass 1's order
            for class_set, group in groups:
                images, labels = batch["image"][group], batch["label"][group]
                source = batch["source"][group] if "source" in batch else None
                local = slice(offset, offset + len(labels))
                columns = {"index": rows[local]}
                for name in self.methods:
                    weights = means[name][assignments[name][local]]
                    with module.cost.measure(name, len(labels)):
                        logits = module.engine.grouped_logits(images, weights, class_set)
                    columns |= {f"w/{name}": weights} | module.update_metrics(split, name, logits, labels, source)
                module.tables[split].add(columns)
                offset += len(labels)
