"""The LightningModule: runs both models once per batch, derives λ, evaluates every method, logs."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import CatMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from tcube_lightning.coefficients import (
    BetaMixture,
    LambdaWeights,
    expert_weight,
    fit_beta_mixture,
    js_divergence,
    t3_lambda,
)
from tcube_lightning.console import print_summary
from tcube_lightning.diagnostics import DecisionDiagnostics, lambda_spread_warning
from tcube_lightning.errors import InputError
from tcube_lightning.merging import FusedParameterStore
from tcube_lightning.methods import METHOD_FAMILIES, BaselineSettings, BatchContext, build_methods
from tcube_lightning.models import (
    architecture_image_size,
    check_architecture,
    checkpoint_kind,
    clip_logits,
    expected_normalization,
    load_clip,
    register_model_config,
    tokenize_prompts,
    zero_shot_head,
)
from tcube_lightning.plots import close_figures, run_figures, save_figures
from tcube_lightning.results import (
    corruption_errors,
    jsonable,
    summary_rows,
    write_results,
    write_summary,
)
from tcube_lightning.samplewise import SampleWiseCLIP, per_sample_loop, unsupported_reason

SPLIT_RECORD_KEYS = (
    "accuracy", "metrics", "coefficients", "diagnostics", "num_samples", "nonfinite_samples", "clusters",
)  # fmt: skip


class TCubeModule(L.LightningModule):
    """T³ test-time merging of a pretrained generalist CLIP and a fine-tuned expert CLIP.

    Args:
        arch: open_clip architecture name shared by both models (e.g. ``ViT-B-16``).
        pretrained_checkpoint: The generalist θ_pt: a checkpoint file (open_clip state_dict, training-style
            ``{'state_dict': …}``, safetensors, OpenAI's TorchScript archive) or an open_clip pretrained tag of
            ``arch`` (e.g. ``openai``) already in the local cache.
        expert_checkpoint: The fine-tuned expert θ_ft, in the same forms.
        model_config: Optional open_clip JSON config (file or folder) defining ``arch``.
        cache_dir: Where open_clip looks for cached pretrained tags (default: the Hugging Face cache).
        methods: Method families to evaluate, default all: zeroshot, expert, ensemble, select, wise_ft,
            slerp, task_arithmetic, ties, dare, m3, t3, t3_batch, dawin, maxconf, xent, t3_cluster,
            dawin_cluster.
        baselines: Hyper-parameters of the baselines (WiSE-FT α values, SLERP, task arithmetic, TIES,
            DARE, DaWin temperatures, the seed of the random ones).
        lambda_min: λ_min of λ(x) = λ_min + (λ_max − λ_min)·σ(γ·JS(x)).
        lambda_max: λ_max of the same mapping.
        gamma: γ of the same mapping (>= 0).
        lambda_weights: Which model λ weights: ``pretrained`` (w_expert = 1 − λ; more disagreement
            → more generalist, as T³'s abstract describes) or ``expert`` (w_expert = λ, DaWin's convention).
        js_base: Logarithm base of JS; None for natural log (range [0, ln 2]), 2 for bits (range [0, 1]).
        merge_text: Merge the text tower too, so every merged model has its own zero-shot head (as the
            reference code does). False keeps the pretrained model's head for every merged model: much
            cheaper, and right for experts whose text tower was not fine-tuned.
        samplewise: How T³ merges per sample: ``vectorized`` (one exact batched pass, two products per
            layer; fast on GPUs), ``loop`` (one fused merge per distinct weight; often as fast on CPUs) or
            ``auto`` (vectorized on accelerators when the architecture allows it, else loop).
        compile: Run the forwards (image logits, zero-shot heads, the vectorized pass) through
            ``torch.compile``: faster on long runs once compiled (see the benchmark), slower to start.
        mce_reference: The method whose errors normalise the corruption errors (CE, mCE).
        clusters: Components of the Beta mixture that groups the coefficients of the clustered methods
            (``t3_cluster``, ``dawin_cluster``): one merged model per component.
        min_lambda_spread: Warn when a split's λ max − λ min is below this (T³ then acts like a fixed merge).
        results_dir: Where results.json / results.md go; default the logger's run folder.
        plots: Draw λ histograms, accuracy against severity and the method × split heat map (PNG files in
            results_dir/plots and TensorBoard images).
        resume: Skip the splits that results_dir/results.json already holds from a run with the same
            configuration (results are rewritten after every split, so an interrupted run keeps those).
    """

    def __init__(
        self,
        arch: str,
        pretrained_checkpoint: str,
        expert_checkpoint: str,
        model_config: str | None = None,
        cache_dir: str | None = None,
        methods: list[str] | None = None,
        baselines: BaselineSettings = BaselineSettings(),
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        gamma: float = 0.5,
        lambda_weights: LambdaWeights = "pretrained",
        js_base: float | None = None,
        merge_text: bool = True,
        samplewise: Literal["auto", "vectorized", "loop"] = "auto",
        compile: bool = False,
        mce_reference: str = "zeroshot",
        clusters: int = 3,
        min_lambda_spread: float = 0.05,
        results_dir: str | None = None,
        resume: bool = False,
        plots: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # logged at the end, with the final metrics
        if lambda_min > lambda_max:
            raise InputError(f"model.lambda_min ({lambda_min}) must not exceed model.lambda_max ({lambda_max})")
        if gamma < 0:
            raise InputError(f"model.gamma must be >= 0, got {gamma}")
        if resume and results_dir is None:
            raise InputError("model.resume needs model.results_dir: the folder whose results.json to continue")
        if clusters < 1:
            raise InputError(f"model.clusters must be >= 1, got {clusters}")
        if samplewise not in ("auto", "vectorized", "loop"):
            raise InputError(f"model.samplewise must be 'auto', 'vectorized' or 'loop', got {samplewise!r}")
        if lambda_weights not in ("pretrained", "expert"):
            raise InputError(f"model.lambda_weights must be 'pretrained' or 'expert', got {lambda_weights!r}")
        unknown = sorted(set(methods or ()) - set(METHOD_FAMILIES))
        if unknown:
            raise InputError(f"model.methods: unknown method(s) {unknown}; available: {list(METHOD_FAMILIES)}")
        if model_config is not None:
            register_model_config(model_config)
        check_architecture(arch)
        for field, path in (("pretrained_checkpoint", pretrained_checkpoint), ("expert_checkpoint", expert_checkpoint)):
            checkpoint_kind(arch, path, f"model.{field}")
        self.method_families = list(methods or METHOD_FAMILIES)
        self.baselines = baselines
        self.store: FusedParameterStore | None = None

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Load both models once the data module has checked its splits (Lightning calls it after)."""
        if self.store is not None:
            return
        data = self.trainer.datamodule
        # Built here rather than in __init__: the methods hold closures, and ddp_spawn pickles the module.
        families = set(self.method_families)
        hp = self.hparams
        built = build_methods(self.baselines, hp.arch)
        self.methods = {n: m for n, m in built.items() if m.family in families}
        self.all_split_names = data.split_names
        self.run_config = jsonable(
            {"model": {k: v for k, v in hp.items() if k[0] != "_" and k != "resume"}, "data": data.hparams}
        )
        self.previous = self._load_previous() if hp.resume else {}
        for split in self.previous:
            data.drop_split(split)
        self.split_names: list[str] = data.split_names
        model_size = architecture_image_size(hp.arch)
        if data.image_size != model_size:
            raise InputError(f"data.image_size is {data.image_size} but {hp.arch} expects {model_size}-pixel images")
        mean, std = expected_normalization(hp.arch, hp.pretrained_checkpoint)
        if not (np.allclose(data.mean, mean) and np.allclose(data.std, std)):
            raise InputError(
                f"data.mean/data.std are {list(data.mean)}/{list(data.std)} but {hp.pretrained_checkpoint} was trained "
                f"with mean {list(mean)} and std {list(std)}: give --data.mean '{list(mean)}' --data.std '{list(std)}'"
            )
        if any("@" in split for split in self.split_names) and hp.mce_reference not in self.methods:
            raise InputError(  # corrupted splits: CE needs the reference method
                f"model.mce_reference: {hp.mce_reference!r} is not among the evaluated methods {list(self.methods)}"
            )
        self.store = FusedParameterStore(
            load_clip(hp.arch, hp.pretrained_checkpoint, hp.cache_dir),
            load_clip(hp.arch, hp.expert_checkpoint, hp.cache_dir),
        )
        reason = unsupported_reason(self.store.pretrained)
        if hp.samplewise == "vectorized" and reason is not None:
            raise InputError(f"model.samplewise=vectorized cannot run {hp.arch}: {reason}; use loop or auto")
        self.unsupported_reason = reason
        # Splits can differ in their classes (base-to-novel): one prompt set, and head, per class list.
        class_sets = list(dict.fromkeys(tuple(data.split_classnames[s]) for s in self.split_names))
        self.split_class_set = {s: class_sets.index(tuple(data.split_classnames[s])) for s in self.split_names}
        self.class_counts = [len(names) for names in class_sets]
        for index, names in enumerate(class_sets):
            tokens = tokenize_prompts(hp.arch, list(names), data.templates)
            self.register_buffer(f"prompt_tokens_{index}", tokens, persistent=False)
        self.metrics = nn.ModuleDict(
            {
                self._key(split, name): split_metrics(
                    self.class_counts[self.split_class_set[split]], data.datasets[split].base.labels
                )
                for split in self.split_names
                for name in self.methods
            }
        )
        # Every sample's λ (gathered from all processes): exact, order-free statistics and the λ plots.
        # Per-sample JS lives in the diagnostics, which need it per quadrant.
        self.lambda_values = nn.ModuleDict({split: CatMetric() for split in self.split_names})
        self.sample_counts = nn.ModuleDict({split: SumMetric() for split in self.split_names})
        self.nonfinite_counts = nn.ModuleDict({split: SumMetric() for split in self.split_names})
        self.diagnostics = nn.ModuleDict({split: DecisionDiagnostics() for split in self.split_names})

    @staticmethod
    def _key(split: str, name: str) -> str:
        return f"{split}__{name}".replace(".", "_")

    def on_test_start(self) -> None:
        """Pick the sample-wise path; zero-shot heads of both models and every fixed merge, once, on the device."""
        self.batches_seen = dict.fromkeys(self.split_names, 0)
        self.clustered = {n: m for n, m in self.methods.items() if m.kind == "clustered"}
        self.cluster_cache = {s: {"pt": [], "ft": [], "t3": []} for s in self.split_names}
        self.cluster_summaries: dict[str, dict[str, dict]] = {s: {} for s in self.split_names}
        self.finished_splits = 0
        self.lambda_arrays: dict[str, np.ndarray] = {}
        self.completed: dict[str, dict] = {}
        # trainer.log_dir is a collective call under DDP: every rank asks, here, once.
        self.results_dir = Path(self.hparams.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        # Set here, not in __init__: ddp_spawn pickles the module, and compiled functions do not pickle.
        self.image_logits, self.text_head = self._compiled(clip_logits), self._compiled(zero_shot_head)
        self._choose_samplewise_path()
        sets = range(len(self.class_counts))
        self.pt_heads = [self._head(self.store.pretrained, c) for c in sets]
        self.ft_heads = [self._head(self.store.expert, c) for c in sets]
        self.static_params = {n: m.static_rule(self.store) for n, m in self.methods.items() if m.kind == "static"}
        self.static_heads = {}
        for name, flat in self.static_params.items():
            model = self.store.load(flat)
            self.static_heads[name] = [self._merged_head(model, c) for c in sets]
        # The models at the two extreme values of λ, for the diagnostics, with their heads computed once.
        hp = self.hparams
        extremes = expert_weight(torch.tensor([hp.lambda_min, hp.lambda_max], dtype=torch.float64), hp.lambda_weights)
        self.extreme_weights = [float(w) for w in extremes] if "t3" in self.methods else []
        self.head_cache = {
            (w, c): self._merged_head(self.store.merge(w), c) for w in self.extreme_weights for c in sets
        }

    def _choose_samplewise_path(self) -> None:
        mode, reason = self.hparams.samplewise, self.unsupported_reason
        if mode == "auto":
            mode = "vectorized" if self.device.type != "cpu" and reason is None else "loop"
            why = "on CPU" if self.device.type == "cpu" else f"the architecture is not covered ({reason})"
            if mode == "loop" and "t3" in self.methods:
                rank_zero_info(f"T³ sample-wise: per-sample loop over the fused store ({why}).")
        self.vectorized_logits = None
        if mode == "vectorized":
            self.vectorized_logits = self._compiled(SampleWiseCLIP(self.store.pretrained, self.store.expert).logits)

    def _compiled(self, function: Callable) -> Callable:
        """``function`` through torch.compile when asked for; dynamic shapes, as batch sizes vary (last batch,
        per-sample loop)."""
        return torch.compile(function, dynamic=True) if self.hparams.compile else function

    def _tokens(self, class_set: int) -> torch.Tensor:
        return getattr(self, f"prompt_tokens_{class_set}")

    def _head(self, model: nn.Module, class_set: int) -> torch.Tensor:
        return self.text_head(model, self._tokens(class_set), self.class_counts[class_set])

    def _merged_head(self, model: nn.Module, class_set: int) -> torch.Tensor:
        """A merged model's zero-shot head: its own text tower's, or the pretrained one's without merge_text."""
        if not self.hparams.merge_text:
            return self.pt_heads[class_set]
        return self._head(model, class_set)

    # ------------------------------------------------------------------ steps
    def merged_logits(self, images: torch.Tensor, weight: float, class_set: int = 0) -> torch.Tensor:
        """Logits of the model merged with expert weight ``weight``."""
        model = self.store.merge(weight)
        head = self.head_cache.get((weight, class_set))
        return self.image_logits(model, images, head if head is not None else self._merged_head(model, class_set))

    def static_logits(self, images: torch.Tensor, name: str, class_set: int = 0) -> torch.Tensor:
        """Logits of the static method ``name``'s merged model (built once, in on_test_start)."""
        return self.image_logits(self.store.load(self.static_params[name]), images, self.static_heads[name][class_set])

    def sample_merged_logits(self, images: torch.Tensor, weights: torch.Tensor, class_set: int = 0) -> torch.Tensor:
        """Logits where sample i runs through the model merged with ``weights[i]``, exactly."""
        if self.vectorized_logits is None:
            return per_sample_loop(partial(self.merged_logits, class_set=class_set), images, weights)
        fixed_head = None if self.hparams.merge_text else self.pt_heads[class_set]
        tokens, count = self._tokens(class_set), self.class_counts[class_set]
        return self.vectorized_logits(images, weights, tokens, count, fixed_head)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._finish_splits_before(dataloader_idx)  # splits run one after another: earlier ones are done
        images, labels = batch
        split = self.split_names[dataloader_idx]
        c = self.split_class_set[split]
        pt_logits = self.image_logits(self.store.pretrained, images, self.pt_heads[c])
        ft_logits = self.image_logits(self.store.expert, images, self.ft_heads[c])
        hp = self.hparams
        # A sample whose logits are not finite gets JS = 0 (the middle of the λ range) rather than NaN,
        # which would poison every merge it takes part in; such samples are counted and reported.
        finite = torch.isfinite(pt_logits).all(-1) & torch.isfinite(ft_logits).all(-1)
        js = torch.where(finite, js_divergence(pt_logits, ft_logits, base=hp.js_base), 0.0)
        lam = t3_lambda(js, hp.lambda_min, hp.lambda_max, hp.gamma)
        weights = expert_weight(lam, hp.lambda_weights)
        ctx = BatchContext(
            images,
            pt_logits,
            ft_logits,
            weights,
            partial(self.merged_logits, class_set=c),
            partial(self.sample_merged_logits, class_set=c),
            partial(self.static_logits, class_set=c),
        )
        for name, method in self.methods.items():
            if method.predict is not None:
                self._update_metrics(split, name, method.predict(ctx), labels)
        if self.clustered:
            for key, values in (("pt", pt_logits), ("ft", ft_logits), ("t3", weights)):
                self.cluster_cache[split][key].append(values.detach())
        self.sample_counts[split].update(torch.tensor(float(len(labels)), device=images.device))
        self.nonfinite_counts[split].update((~finite).sum().float())
        extremes = tuple(ctx.merged_logits(images, w).argmax(-1) for w in self.extreme_weights) or None
        self.diagnostics[split].update(pt_logits, ft_logits, labels, js, extremes)
        self._record_coefficients(split, js, lam)

    def _update_metrics(self, split: str, method: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.metrics[self._key(split, method)].update(logits.float().softmax(-1), labels)

    def _record_coefficients(self, split: str, js: torch.Tensor, lam: torch.Tensor) -> None:
        """Keep every sample's λ for the results and log this batch's λ and JS to the logger."""
        self.lambda_values[split].update(lam.detach())
        # The batch's index in the one-process order (processes read whole batches in turn, see WholeBatchSampler).
        step = self.batches_seen[split] * self.trainer.world_size + self.global_rank
        self.batches_seen[split] += 1
        if self.logger is None:
            return
        scalars = {}
        for name, values in (("lambda", lam), ("js", js)):
            scalars.update(
                {
                    f"{split}/{name}_mean": values.mean(),
                    f"{split}/{name}_min": values.min(),
                    f"{split}/{name}_max": values.max(),
                }
            )
        self.logger.log_metrics({k: float(v) for k, v in scalars.items()}, step=step)
        if isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            self.logger.experiment.add_histogram(f"{split}/lambda", lam.float().cpu(), step)
            self.logger.experiment.add_histogram(f"{split}/js", js.float().cpu(), step)

    # -------------------------------------------------------------- reporting
    def _clustered_pass(self, index: int) -> None:
        """Pass 2 of the clustered methods on split ``index``: fit a Beta mixture to the split's coefficients
        (all ranks'), then run every sample through the model merged at its component's mean, one merge per
        component. Pass 1's pretrained and expert forwards are not repeated."""
        split = self.split_names[index]
        cache = {key: torch.cat(values) for key, values in self.cluster_cache[split].items()}
        local_rows = gather_from_all_ranks(torch.tensor([len(cache["t3"])]))
        start = int(local_rows[: self.global_rank].sum())
        everything = {key: gather_from_all_ranks(values) for key, values in cache.items()}
        assignments, means = {}, {}
        for name, method in self.clustered.items():
            coefficients = method.coefficient(everything["pt"], everything["ft"], everything["t3"])
            mixture = fit_beta_mixture(coefficients, self.hparams.clusters)
            local = coefficients[start : start + len(cache["t3"])]
            assignments[name] = mixture.assign(local).to(self.device)
            means[name] = [float(m) for m in mixture.means]
            self.cluster_summaries[split][name] = mixture_summary(mixture)
            if mixture.note:
                rank_zero_warn(f"split {split!r}, {name}: {mixture.note}")
        # Under the trainer's precision (e.g. bf16 autocast), like test_step: this pass may run from an epoch hook.
        with self.trainer.precision_plugin.test_step_context():
            self._clustered_predictions(index, assignments, means)

    def _clustered_predictions(self, index: int, assignments: dict, means: dict) -> None:
        """Every local sample through the model merged at its component's mean, and into the metrics."""
        split = self.split_names[index]
        merged_logits = partial(self.merged_logits, class_set=self.split_class_set[split])
        offset = 0
        for batch in self.trainer.test_dataloaders[index]:
            images, labels = self.transfer_batch_to_device(batch, self.device, index)
            rows = slice(offset, offset + len(labels))
            for name in self.clustered:
                weights = torch.tensor(means[name], device=self.device)[assignments[name][rows]]
                self._update_metrics(split, name, per_sample_loop(merged_logits, images, weights), labels)
            offset += len(labels)

    def _finish_splits_before(self, index: int) -> None:
        """Finish every split before ``index``, in order, on every process, including those that got no batch
        of a split: each finish reduces across processes, so all must take part."""
        while self.finished_splits < index:
            self._finish_split(self.finished_splits)
            self.finished_splits += 1

    def _take_part_without_batches(self, split: str) -> None:
        """A process that read no batch of ``split`` joins its reductions with empty, correctly shaped states."""
        classes = self.class_counts[self.split_class_set[split]]
        no_logits = torch.empty(0, classes, device=self.device)
        no_labels = torch.empty(0, dtype=torch.long, device=self.device)
        for name in self.methods:  # the counting metrics need nothing; AUROC gathers (N, classes) scores
            for metric in self.metrics[self._key(split, name)].values():
                if isinstance(metric, MulticlassAUROC):
                    metric.update(no_logits, no_labels)
        for key, empty in (("pt", no_logits), ("ft", no_logits), ("t3", no_logits.new_empty(0))):
            self.cluster_cache[split][key].append(empty)
        self.diagnostics[split].update(no_logits, no_logits, no_labels, no_logits.new_empty(0))

    def _finish_split(self, index: int) -> None:
        """A split is done: second pass if needed, reduce its metrics (all ranks), rewrite the results files."""
        split = self.split_names[index]
        if self.batches_seen[split] == 0:
            self._take_part_without_batches(split)
        if self.clustered:
            self._clustered_pass(index)
        metrics = {
            m: {k: float(v) for k, v in self.metrics[self._key(split, m)].compute().items()} for m in self.methods
        }
        lam = self.lambda_values[split].compute()
        if self.hparams.plots:
            self.lambda_arrays[split] = lam.cpu().numpy()
        diagnostics = self.diagnostics[split].compute()
        js_mean = diagnostics.pop("js_mean")
        if not self.extreme_weights:  # not measured without T³
            del diagnostics["flips_between_lambda_extremes"]
        self.completed[split] = {
            "accuracy": {m: values["top1"] for m, values in metrics.items()},
            "metrics": metrics,
            "coefficients": {**lambda_statistics(lam), "js_mean": js_mean},
            "diagnostics": diagnostics,
            "num_samples": int(self.sample_counts[split].compute()),
            "nonfinite_samples": int(self.nonfinite_counts[split].compute()),
            "clusters": self.cluster_summaries[split],
        }
        if self.trainer.is_global_zero:
            self._write_results()

    def _load_previous(self) -> dict[str, dict]:
        """With resume: the splits an earlier run with the same configuration finished, from its results.json."""
        path = Path(self.hparams.results_dir) / "results.json"
        if not path.is_file():
            return {}
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InputError(f"model.resume: {path} is not valid JSON ({err})") from err
        if previous.get("config") != self.run_config:
            old, new = previous.get("config", {}), self.run_config
            differing = sorted(
                f"{group}.{key}"
                for group in ("model", "data")
                for key in set(old.get(group, {})) | set(new[group])
                if old.get(group, {}).get(key) != new[group].get(key)
            )
            raise InputError(
                f"model.resume: {path} was written with another configuration (differs in {differing or 'layout'}); "
                "use another model.results_dir or remove that file"
            )
        done = previous.get("accuracy", {})
        rank_zero_info(f"Resuming: {len(done)} split(s) already in {path} are skipped: {list(done)}")
        return {split: {key: previous[key][split] for key in SPLIT_RECORD_KEYS} for split in done}

    def _results(self) -> dict:
        """Everything finished so far (this run's splits and, with resume, the earlier run's), per key."""
        records = {**self.previous, **self.completed}
        order = [s for s in self.all_split_names if s in records]
        results = {key: {s: records[s][key] for s in order} for key in SPLIT_RECORD_KEYS}
        results["methods"] = {m.name: m.description for m in self.methods.values()}
        results["config"] = self.run_config
        errors = corruption_errors(results["accuracy"], self.hparams.mce_reference)
        if errors:
            results["corruption_errors"] = {"reference": self.hparams.mce_reference, "ce": errors}
        return results

    def _write_results(self) -> tuple[Path, Path]:
        results = self._results()
        paths = write_results(self.results_dir, results)
        write_summary(self.results_dir, self._summary_rows(results))
        return paths

    @staticmethod
    def _summary_rows(results: dict) -> list[dict]:
        return summary_rows(results["accuracy"], results.get("corruption_errors", {}).get("ce", {}))

    def _log_final_metrics(self, metrics: dict[str, dict[str, dict[str, float]]]) -> None:
        """Every split's metrics per method as scalars ``{split}/{metric}/{method}``; with TensorBoard also in its
        HPARAMS tab beside the run's configuration, so that runs (a γ sweep, say) can be compared there."""
        final = {
            f"{split}/{name}/{method}": value
            for split, per_method in metrics.items()
            for method, values in per_method.items()
            for name, value in values.items()
        }
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.log_hyperparams(self.run_config, metrics=final, step=0)
        else:
            self.logger.log_metrics(final, step=0)

    def _plot(self, accuracy: dict[str, dict[str, float]]) -> None:
        """PNG files in results_dir/plots, and the same figures as TensorBoard images."""
        figures = run_figures(accuracy, self.lambda_arrays)
        save_figures(self.results_dir / "plots", figures)
        if isinstance(self.logger, TensorBoardLogger):
            for stem, figure in figures.items():
                self.logger.experiment.add_figure(f"plots/{stem}", figure, close=False)
        close_figures(figures)

    def on_test_epoch_end(self) -> None:
        """Finish the last split(s), then report on rank 0."""
        self._finish_splits_before(len(self.split_names))
        if not self.trainer.is_global_zero:
            return
        results = self._results()
        accuracy = results["accuracy"]
        if self.logger is not None:
            self._log_final_metrics(results["metrics"])
        affected = {s: n for s, n in results["nonfinite_samples"].items() if n}
        if affected:
            rank_zero_warn(
                f"non-finite logits from the pretrained or expert model for {sum(affected.values())} sample(s) "
                f"(per split: {affected}); their JS was set to 0. Check the inputs and checkpoints."
            )
        warning = lambda_spread_warning(results["coefficients"], self.hparams.min_lambda_spread)
        if warning and "t3" in self.methods:
            rank_zero_warn(warning)
        json_path, md_path = self._write_results()
        if self.hparams.plots:
            self._plot(accuracy)
        print_summary(self._summary_rows(results), "Top-1 accuracy (%)")
        rank_zero_info(f"Results written to {json_path}, {md_path} (every split) and summary.md/csv/json beside them")


def gather_from_all_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``values`` concatenated in rank order (the tensor itself without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values.cpu())
    return torch.cat(parts)


def lambda_statistics(lam: torch.Tensor) -> dict[str, float]:
    """Range and mean of a split's λ. ``math.fsum`` rounds the exact sum once, so the mean does not depend on
    how the samples were spread over processes."""
    values = lam.flatten().tolist()
    return {"lambda_min": min(values), "lambda_max": max(values), "lambda_mean": math.fsum(values) / len(values)}


def mixture_summary(mixture: BetaMixture) -> dict:
    """A fitted mixture as plain numbers for results.json."""
    summary = {"means": mixture.means.tolist(), "weights": mixture.weights.tolist()}
    summary.update(a=mixture.a.tolist(), b=mixture.b.tolist())
    return summary | ({"note": mixture.note} if mixture.note else {})


def split_metrics(num_classes: int, labels) -> MetricCollection:  # noqa: ANN001 - array-like
    """Top-1, balanced accuracy (macro recall) and, where every class occurs in the split, macro AUC."""
    metrics = {
        "top1": MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "balanced_accuracy": MulticlassAccuracy(num_classes=num_classes, average="macro"),
    }
    if len(set(int(v) for v in labels)) == num_classes:
        metrics["auc"] = MulticlassAUROC(num_classes=num_classes, average="macro")
    return MetricCollection(metrics)
