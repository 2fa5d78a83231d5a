"""The LightningModule: the run's life cycle around the engine. Argument checks, metrics, ``test_step``, each
split's finish with its DDP reductions; the maths is in ``engine`` and ``coefficients``, what a run writes in
``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import CatMetric, SumMetric

from tcube_lightning.coefficients import LambdaMapping, LambdaWeights, fit_beta_mixture
from tcube_lightning.cost import DIAGNOSTICS, SHARED, CostMeter
from tcube_lightning.diagnostics import DecisionDiagnostics
from tcube_lightning.engine import TCubeEngine
from tcube_lightning.errors import InputError
from tcube_lightning.methods import METHOD_FAMILIES, BaselineSettings, build_methods
from tcube_lightning.metrics import PER_SAMPLE_STATES, gather_from_all_ranks, split_metrics
from tcube_lightning.models import (
    check_architecture,
    check_preprocessing,
    checkpoint_kind,
    load_clip,
    register_model_config,
    tokenize_prompts,
)
from tcube_lightning.quiet import quiet_lightning
from tcube_lightning.report import (
    RunReport,
    lambda_statistics,
    load_previous,
    log_batch_coefficients,
    mixture_summary,
)
from tcube_lightning.results import check_results_dir, jsonable
from tcube_lightning.splitnames import is_corrupted

quiet_lightning()  # also in the processes ddp_spawn starts, which import this module


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
        lambda_weights: Which model λ weights: ``expert`` (default, w_expert = λ: T³'s Figure 4 and the DaWin
            code it reuses) or ``pretrained`` (w_expert = 1 − λ: the reading of T³'s abstract).
        js_base: Logarithm base of JS; None for natural log (range [0, ln 2]), 2 for bits (range [0, 1]).
        merge_text: Merge the text tower too, so every merged model has its own zero-shot head (as the
            reference code does). False keeps the pretrained model's head for every merged model: much
            cheaper, and right for experts whose text tower was not fine-tuned.
        samplewise: How T³ merges per sample: ``vectorized`` (one exact batched pass, two products per
            layer), ``loop`` (one fused merge per distinct weight) or ``auto``: both timed on a probe batch on
            this device, the faster taken (with compile, untimed: vectorized unless exact heads on CPU).
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
        overwrite: Replace the results a results_dir already holds; without it (or resume) such a run is refused.
        heads: With merge_text, where merged models' zero-shot heads come from: ``interpolated`` (default) from
            heads at a few Chebyshev nodes in the expert weight, fitted once per run, or ``exact``: a text pass
            over every class prompt per merged weight (per sample for the sample-wise methods).
        head_tolerance: The largest change of a logit interpolated heads may cause (checked against direct
            text passes at seeded points; the node count grows until it holds, else exact heads are used).
        diagnose_extremes: With T³, count prediction flips between the models at λ_min and λ_max: two more merged
            forwards per batch, about 2 % of the demo's full evaluation (benchmarks/bench_demo.py).
    """

    def __init__(
        self,
        arch: str,
        pretrained_checkpoint: str,
        expert_checkpoint: str,
        model_config: str | None = None,
        cache_dir: str | None = None,
        methods: list[str] | str | None = None,
        baselines: BaselineSettings = BaselineSettings(),
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        gamma: float = 0.5,
        lambda_weights: LambdaWeights = "expert",
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
        overwrite: bool = False,
        heads: Literal["interpolated", "exact"] = "interpolated",
        head_tolerance: float = 1e-4,
        diagnose_extremes: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # logged at the end, with the final metrics
        self.mapping = LambdaMapping(lambda_min, lambda_max, gamma, lambda_weights, js_base)
        if resume and results_dir is None:
            raise InputError("model.resume needs model.results_dir: the folder whose results.json to continue")
        if results_dir is not None:
            check_results_dir(results_dir, resume, overwrite)
        if clusters < 1:
            raise InputError(f"model.clusters must be >= 1, got {clusters}")
        if heads not in ("interpolated", "exact") or head_tolerance <= 0:
            raise InputError(f"model.heads {heads!r} (interpolated or exact) or head_tolerance {head_tolerance} (> 0)")
        if samplewise not in ("auto", "vectorized", "loop"):
            raise InputError(f"model.samplewise must be 'auto', 'vectorized' or 'loop', got {samplewise!r}")
        methods = [methods] if isinstance(methods, str) else methods  # `--model.methods t3`: one family
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
        names = [n for n, m in build_methods(baselines, arch).items() if m.family in self.method_families]
        if mce_reference not in names:  # an error once corrupted splits need it (setup), said here already
            rank_zero_warn(
                f"model.mce_reference: {mce_reference!r} is not among the evaluated methods {names}; corrupted "
                "splits (CE, mCE) will be refused"
            )
        self.engine: TCubeEngine | None = None

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Load both models once the data module has checked its splits (Lightning calls it after)."""
        if self.engine is not None:
            return
        data = self.trainer.datamodule
        hp = self.hparams
        # Built here rather than in __init__: the methods hold closures, and ddp_spawn pickles the module.
        families = set(self.method_families)
        self.methods = {n: m for n, m in build_methods(self.baselines, hp.arch).items() if m.family in families}
        self.all_split_names = data.split_names
        run_keys = {k: v for k, v in hp.items() if k[0] != "_" and k not in ("resume", "overwrite")}
        self.run_config = jsonable({"model": run_keys, "data": data.hparams})
        self.previous = load_previous(hp.results_dir, self.run_config) if hp.resume else {}
        for split in self.previous:
            data.drop_split(split)
        self.split_names: list[str] = data.split_names
        if not self.split_names:  # resuming a finished run: Lightning runs no hook without a split, report here
            rank_zero_info(f"Every split is already in {hp.results_dir}/results.json: nothing left to evaluate.")
            if self.trainer.is_global_zero:
                self._new_report(Path(hp.results_dir)).finish(self.logger, hp.plots, self._spread_threshold())
            return
        self._check_data_fits(data)
        # Splits can differ in their classes (base-to-novel): one prompt set, and head, per class list.
        self.split_classnames = {s: list(data.split_classnames[s]) for s in self.split_names}
        class_sets = list(dict.fromkeys(tuple(data.split_classnames[s]) for s in self.split_names))
        self.split_class_set = {s: class_sets.index(tuple(data.split_classnames[s])) for s in self.split_names}
        self.class_counts = [len(names) for names in class_sets]
        self.engine = TCubeEngine(
            load_clip(hp.arch, hp.pretrained_checkpoint, hp.cache_dir),
            load_clip(hp.arch, hp.expert_checkpoint, hp.cache_dir),
            [tokenize_prompts(hp.arch, list(names), data.templates) for names in class_sets],
            self.class_counts,
            self.mapping,
            hp.merge_text,
            hp.samplewise,
            hp.compile,
            hp.heads,
            hp.head_tolerance,
        )
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

    def _check_data_fits(self, data: L.LightningDataModule) -> None:
        """What only the data and the model settings together can tell, checked before any model loads."""
        hp = self.hparams
        check_preprocessing(hp.arch, hp.pretrained_checkpoint, data.image_size, data.mean, data.std)
        if any(is_corrupted(split) for split in self.split_names) and hp.mce_reference not in self.methods:
            raise InputError(  # corrupted splits: CE needs the reference method
                f"model.mce_reference: {hp.mce_reference!r} is not among the evaluated methods {list(self.methods)}"
            )

    @staticmethod
    def _key(split: str, name: str) -> str:
        return f"{split}__{name}".replace(".", "_")

    def on_test_start(self) -> None:
        """The engine's heads and fixed merges, once, on the device; the report of this run."""
        hp = self.hparams
        self.batches_seen = dict.fromkeys(self.split_names, 0)
        self.cost = CostMeter(self.device)
        self.clustered = {n: m for n, m in self.methods.items() if m.is_clustered}
        self.cluster_cache = {s: {"pt": [], "ft": [], "t3": []} for s in self.split_names}
        self.cluster_summaries: dict[str, dict[str, dict]] = {s: {} for s in self.split_names}
        self.finished_splits = 0
        # trainer.log_dir is a collective call under DDP: every rank asks, here, once.
        self.report = self._new_report(Path(hp.results_dir or self.trainer.log_dir or self.trainer.default_root_dir))
        static_rules = {n: m.static_rule for n, m in self.methods.items() if m.is_static}
        extremes = hp.diagnose_extremes and "t3" in self.methods
        path = self.engine.prepare(static_rules, extremes=extremes, weight_range=self._weight_range())
        self.report.details["heads"] = self.engine.head_summary
        measurable = hp.samplewise == "auto" and self.engine.vectorized_logits is not None and not hp.compile
        if measurable and any(m.per_sample for m in self.methods.values()):
            self._measure_samplewise_paths()
        elif hp.samplewise == "auto" and path == "loop" and "t3" in self.methods:
            rank_zero_info(f"T³ sample-wise: the loop ({self.engine.unsupported_reason or 'exact heads on CPU'}).")

    def _measure_samplewise_paths(self) -> None:
        """``samplewise: auto``: time both sample-wise paths on a seeded probe batch, on this device; every
        process takes rank 0's choice (the two agree to float rounding)."""
        data, low_high = self.trainer.datamodule, self._weight_range() or (0.0, 1.0)
        size, count = data.image_size, min(data.batch_size, 16)
        probe = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        seconds = self.engine.time_paths(probe, torch.linspace(*low_high, count, device=self.device))
        self.engine.path = self.trainer.strategy.broadcast(min(seconds, key=seconds.get), src=0)
        measured = ", ".join(f"{path} {1e3 * value:.1f} ms" for path, value in seconds.items())
        rank_zero_info(f"T³ sample-wise: the {self.engine.path} path (measured on a probe batch: {measured}).")

    def _new_report(self, results_dir: Path) -> RunReport:
        descriptions = {m.name: m.description for m in self.methods.values()}
        settings = (self.all_split_names, descriptions, self.run_config, self.hparams.mce_reference, self.previous)
        return RunReport(results_dir, *settings)

    def _weight_range(self) -> tuple[float, float] | None:
        """The expert weights the dynamic methods can merge at (a little wider, for float32 rounding of λ)."""
        ranges = [self.mapping.weight_range() if m.weight_source == "t3" else (0.0, 1.0)
                  for m in self.methods.values() if m.weight_source is not None]  # fmt: skip
        if not ranges:
            return None
        return min(low for low, _ in ranges) - 1e-6, max(high for _, high in ranges) + 1e-6

    def _spread_threshold(self) -> float | None:
        """The λ-spread warning's threshold where T³ is evaluated, else None (no warning)."""
        return self.hparams.min_lambda_spread if "t3" in self.methods else None

    # ------------------------------------------------------------------ steps
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._finish_splits_before(dataloader_idx)  # splits run one after another: earlier ones are done
        images, labels = batch
        split = self.split_names[dataloader_idx]
        class_set = self.split_class_set[split]
        with self.cost.measure(SHARED, len(labels)):
            shared = self.engine.coefficients(images, class_set)
        ctx = self.engine.context(images, shared, class_set)
        for name, method in self.methods.items():
            if not method.is_clustered:  # those predict in the second pass
                with self.cost.measure(name, len(labels)):
                    logits = method.logits(ctx)
                self._update_metrics(split, name, logits, labels)
        if self.clustered:
            for key, values in (("pt", shared.pt_logits), ("ft", shared.ft_logits), ("t3", shared.weights)):
                self.cluster_cache[split][key].append(values.detach())
        self.sample_counts[split].update(torch.tensor(float(len(labels)), device=images.device))
        self.nonfinite_counts[split].update((~shared.finite).sum().float())
        with self.cost.measure(DIAGNOSTICS if self.engine.extreme_weights else None, len(labels)):
            extremes = self.engine.extreme_predictions(images, class_set)
        self.diagnostics[split].update(shared.pt_logits, shared.ft_logits, labels, shared.js, extremes)
        self._record_coefficients(split, shared.js, shared.lam)

    def _update_metrics(self, split: str, method: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.metrics[self._key(split, method)].update(logits.float().softmax(-1), labels)

    def _record_coefficients(self, split: str, js: torch.Tensor, lam: torch.Tensor) -> None:
        """Keep every sample's λ for the results and log this batch's λ and JS to the logger."""
        self.lambda_values[split].update(lam.detach())
        # The batch's index in the one-process order (processes read whole batches in turn, see WholeBatchSampler).
        step = self.batches_seen[split] * self.trainer.world_size + self.global_rank
        self.batches_seen[split] += 1
        if self.logger is not None:
            log_batch_coefficients(self.logger, split, step, {"lambda": lam, "js": js}, self.trainer.is_global_zero)

    # ------------------------------------------------------------- split ends
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
        class_set = self.split_class_set[split]
        offset = 0
        for batch in self.trainer.test_dataloaders[index]:
            images, labels = self.transfer_batch_to_device(batch, self.device, index)
            rows = slice(offset, offset + len(labels))
            for name in self.clustered:
                weights = torch.tensor(means[name], device=self.device)[assignments[name][rows]]
                with self.cost.measure(name, len(labels)):
                    logits = self.engine.grouped_logits(images, weights, class_set)
                self._update_metrics(split, name, logits, labels)
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
        for name in self.methods:  # the counting metrics need nothing; the others gather per-sample states
            for metric in self.metrics[self._key(split, name)].values():
                if isinstance(metric, PER_SAMPLE_STATES):
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
        diagnostics = self.diagnostics[split].compute()
        js_mean = diagnostics.pop("js_mean")
        if not self.engine.extreme_weights:  # not measured without T³
            del diagnostics["flips_between_lambda_extremes"]
        record = {
            "accuracy": {m: values["top1"] for m, values in metrics.items()},
            "metrics": metrics,
            "coefficients": {**lambda_statistics(lam), "js_mean": js_mean},
            "diagnostics": diagnostics,
            "num_samples": int(self.sample_counts[split].compute()),
            "nonfinite_samples": int(self.nonfinite_counts[split].compute()),
            "clusters": self.cluster_summaries[split],
            "classnames": self.split_classnames[split],
        }
        if self.trainer.is_global_zero:
            self.report.add_split(split, record, lam.cpu().numpy())

    def on_test_epoch_end(self) -> None:
        """Finish the last split(s), then report on rank 0."""
        self._finish_splits_before(len(self.split_names))
        if self.trainer.is_global_zero:
            self.report.finish(self.logger, self.hparams.plots, self._spread_threshold(), self.cost.table())
