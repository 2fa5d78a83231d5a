"""The LightningModule: the run's life cycle around the engine. Set-up, ``test_step``, each split's finish with its
DDP reductions; the maths is in ``engine`` and ``merging``, what a run writes in ``reporting``, the clustered second
pass and AdaMerging's adaptation in their own rooms beside this one."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tcube_lightning.data.calibration import CALIBRATION
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.engine.zero_shot import tokenize_prompts
from tcube_lightning.evaluation.adaptation import adapt_methods, adaptation_split
from tcube_lightning.evaluation.batches import BatchEvaluation, GroupResult, readable_rows
from tcube_lightning.evaluation.clustered import ClusteredPass
from tcube_lightning.evaluation.options import (
    check_batch_limit,
    check_data_fits,
    check_precision,
    check_prediction_options,
    check_run_options,
    method_families,
)
from tcube_lightning.evaluation.predicting import PredictHooks
from tcube_lightning.evaluation.splits import class_sets, mixed_or_plain, split_sources
from tcube_lightning.loading import plan_models
from tcube_lightning.loading.contexts import context_prompts
from tcube_lightning.merging.adamerging import AdaMergingSettings
from tcube_lightning.merging.coefficients import KExperts, LambdaMapping, LambdaWeights, grid_mappings
from tcube_lightning.merging.methods import BaselineSettings, build_methods, with_grid
from tcube_lightning.quiet import quiet_lightning
from tcube_lightning.reporting.cost import CostMeter
from tcube_lightning.reporting.deferral import coverage_columns, deferral
from tcube_lightning.reporting.guarantee import (
    NOT_MERGING,
    CalibratedRules,
    GuaranteeSettings,
    accepted_columns,
    calibrate,
    calibration_columns,
    guarantee_record,
    set_columns,
)
from tcube_lightning.reporting.logged import log_batch_coefficients
from tcube_lightning.reporting.metrics import RunMetrics
from tcube_lightning.reporting.records import mix_record, split_record
from tcube_lightning.reporting.report import RunReport, extension_note
from tcube_lightning.reporting.results import jsonable
from tcube_lightning.reporting.resume import load_previous, trainer_settings
from tcube_lightning.reporting.runfolder import clear_earlier_run
from tcube_lightning.reporting.samples import SampleTable

quiet_lightning()  # also in the processes ddp_spawn starts, which import this module


class TCubeModule(PredictHooks, L.LightningModule):
    """T³ test-time merging of a pretrained generalist CLIP and a fine-tuned expert CLIP.

    Args:
        arch: The architecture both models share: an open_clip name (e.g. ``ViT-B-16``), ``hf-hub:org/repo`` (an
            open_clip model in the local Hugging Face cache, e.g. BiomedCLIP) or ``local-dir:DIR`` (a folder with
            open_clip_config.json); left out when the generalist is a transformers CLIPModel folder (its config.json
            is then the architecture).
        pretrained_checkpoint: The generalist θ_pt: a checkpoint file (open_clip state_dict, training-style
            ``{'state_dict': …}``, safetensors, OpenAI's TorchScript archive), a transformers CLIPModel folder, or an
            open_clip pretrained tag of ``arch`` (e.g. ``openai``) already in the local cache. Left out with a
            ``hf-hub:``/``local-dir:`` arch: that model's own weights. A file given is loaded strictly into ``arch``.
        expert_checkpoint: The fine-tuned expert θ_ft: any of the forms above, a peft LoRA adapter folder
            (adapter_config.json) or a RobustMedCLIP LoRA checkpoint (model.pth), both on the generalist.
        experts: Several experts instead, by name: name → any checkpoint ``expert_checkpoint`` takes, e.g.
            ``{blood: …, breast: …}``; merged as θ_pt + Σ_k w_k·τ_k (T³ with several experts is our extension of
            T³: ``k_experts``).
        model_config: Optional open_clip JSON config (file or folder) defining ``arch``.
        key_prefix: Where a checkpoint holds the architecture's weights under several prefixes (a model and its EMA,
            ``state_dict.`` and ``state_dict_ema.``), the one to read; the others are found, not given (``inspect``
            shows them).
        context_init: With an expert whose file has a learned prompt context (CoOp, TPT) and a generalist without one:
            the words the generalist's context is made of (its token embeddings of them, as TPT starts), for merged
            text towers; as many tokens as the expert's context.
        cache_dir: The Hugging Face cache where pretrained tags, ``hf-hub:`` models and their text towers and
            tokenizers are looked up (default: Hugging Face's, HF_HOME).
        methods: Method families to evaluate, default all but AdaMerging's (``predict``: t3): zeroshot, expert,
            ensemble, select, wise_ft, slerp, task_arithmetic, ties, dare, m3, t3, t3_batch, dawin, maxconf, xent,
            t3_cluster, dawin_cluster, and on request soup, dawin_mtl, adamerging_task, adamerging_layer
            (coefficients learnt on each split's images by entropy minimisation: hundreds of optimiser steps per
            split). With several experts: zeroshot, expert (one column per expert), ensemble, select, soup,
            task_arithmetic, ties, dare, t3, t3_batch, dawin_mtl and on request AdaMerging's; the others are
            between the generalist and one expert, and refused.
        baselines: Hyper-parameters of the baselines (WiSE-FT α values, SLERP, task arithmetic, TIES,
            DARE, DaWin temperatures, the seed of the random ones).
        adamerging: AdaMerging's options (steps, learning rate, batch size, initial λ, clamping, seed, and
            ``adapt_on``: a split to adapt on once for every split, instead of each split on its own images).
        lambda_min: λ_min of λ(x) = λ_min + (λ_max − λ_min)·σ(γ·JS(x)).
        lambda_max: λ_max of the same mapping.
        gamma: γ of the same mapping (>= 0).
        lambda_weights: Which model λ weights: ``expert`` (default, w_expert = λ: T³'s Figure 4 and the DaWin
            code it reuses) or ``pretrained`` (w_expert = 1 − λ: the reading of T³'s abstract).
        js_base: Logarithm base of JS; None for natural log (range [0, ln 2]), 2 for bits (range [0, 1]).
        grid: Further T³ settings (gamma, lambda_min, lambda_max, lambda_weights; unset fields keep the run's),
            evaluated on the same batches and pretrained and expert forwards: each gives columns of its own for
            the methods merging with T³'s weights, e.g. ``t3[gamma=4]``, ``t3_batch[gamma=4]``.
        merge_text: Merge the text tower too, so every merged model has its own zero-shot head (as the
            reference code does). False keeps the pretrained model's head for every merged model: much
            cheaper, and right for experts whose text tower was not fine-tuned. None (default): true with one expert,
            false with several (FusionBench and AdaMerging merge the image tower only); with several, true means a
            text pass over every class prompt per merged weight vector (per sample for T³).
        k_experts: With several experts, how T³'s per-expert coefficients combine (our extension): ``rule``
            ``independent`` (w_k = λ_k·s, ``scale`` s default 1/K) or ``routed`` (w_k = λ_k·r_k, r the softmax over
            the experts of −H(p_k)).
        samplewise: How T³ merges per sample: ``vectorized`` (one exact batched pass: open_clip's towers by hand,
            timm and Hugging Face towers leaf by leaf, a LoRA expert's targets by their low-rank term), ``loop``
            (one fused merge per distinct weight) or ``auto``: vectorized wherever a pass runs the model exactly,
            except exact heads on CPU (a text pass per sample), where the loop is faster. The choice is recorded
            in results.json (``samplewise``).
        compile: Run the forwards (image logits, zero-shot heads, the vectorized pass) and the merge of several
            full experts through ``torch.compile``: faster on long runs once compiled (see the benchmark), slower
            to start.
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
            forwards per batch, about 10 % of the demo's full evaluation (benchmarks/bench_demo.py).
        export_samples: Write each split's per-sample values to results_dir/samples/<split>.npz: index, label, JS,
            λ per setting, each dynamic method's expert weight, each method's predicted class and its probability.
        guarantee: With ``data.calibration``: the selective risk α deferral promises to stay under with probability
            1 − δ (Learn then Test), and the conformal sets' coverage 1 − α, each fixed on the calibration split.
    """

    def __init__(
        self,
        arch: str | None = None,
        pretrained_checkpoint: str | None = None,
        expert_checkpoint: str | None = None,
        experts: dict[str, str] | None = None,
        model_config: str | None = None,
        key_prefix: str | None = None,
        context_init: str = "a photo of a",
        cache_dir: str | None = None,
        methods: list[str] | str | None = None,
        baselines: BaselineSettings = BaselineSettings(),
        adamerging: AdaMergingSettings = AdaMergingSettings(),
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        gamma: float = 0.5,
        lambda_weights: LambdaWeights = "expert",
        js_base: float | None = None,
        grid: list[dict[str, Any]] | None = None,
        merge_text: bool | None = None,
        k_experts: KExperts = KExperts(),
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
        export_samples: bool = False,
        guarantee: GuaranteeSettings = GuaranteeSettings(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # logged at the end, with the final metrics
        self.mapping = LambdaMapping(lambda_min, lambda_max, gamma, lambda_weights, js_base)
        self.grid = grid_mappings(self.mapping, list(grid or []))
        check_run_options(resume, results_dir, overwrite, clusters, heads, head_tolerance, samplewise)
        self.model_plan = plan_models(
            arch, pretrained_checkpoint, expert_checkpoint, cache_dir, model_config, experts, key_prefix
        )
        self.expert_names = list(self.model_plan.experts)
        self.method_families = method_families(methods, len(self.expert_names))
        self.baselines, self.adamerging, self.k_experts = baselines, adamerging, k_experts
        self.guarantee = guarantee
        self.engine: TCubeEngine | None = None
        self.started = time.time()
        """When this run began: files in its folder written since are its own (``runfolder``)."""
        self.results_written = False

    # ----------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        """Load both models once the data module has checked its splits (Lightning calls it after)."""
        if self.engine is not None:
            return
        data = self.trainer.datamodule
        hp = self.hparams
        self.predicting = stage == "predict"
        check_precision(str(self.trainer.precision), self.trainer.strategy.root_device.type)
        command = "predict" if self.predicting else "test"
        check_batch_limit(getattr(self.trainer, f"limit_{command}_batches"), command)
        if self.predicting:
            check_prediction_options(hp.results_dir, hp.resume, hp.overwrite)
        # Built here rather than in __init__: the methods hold closures, and ddp_spawn pickles the module.
        default = ["t3"] if self.predicting and hp.methods is None else self.method_families
        families, every = set(default), self._all_methods()
        self.methods = {n: m for n, m in every.items() if m.family in families}
        if self.predicting:
            chosen = "as model.methods names them" if hp.methods is not None else "the default; model.methods chooses"
            rank_zero_info(f"predict runs {list(self.methods)} ({chosen})")
            note = extension_note({n: m.description for n, m in self.methods.items()})
            if note:
                rank_zero_info(note)
        self.adapted = {n: m for n, m in self.methods.items() if m.is_adapted}
        self.adapt_on = adaptation_split(self.adamerging.adapt_on, data) if self.adapted else None
        """(split, its data, its class names, replaced by its class set's index below) to adapt on once."""
        # Per-sample weights kept for the analysis whether evaluated or not (cheap: the shared forwards give them).
        self.weight_methods = {
            n: m for n, m in every.items() if m.merge_weights and (m.per_sample or m.family in families)
        }
        self.all_split_names = [s for s in data.split_names if s != CALIBRATION]  # what results.json reports
        run_keys = {k: v for k, v in hp.items() if k[0] != "_" and k not in ("resume", "overwrite")}
        self.run_config = jsonable({"model": run_keys, "data": data.hparams, "trainer": trainer_settings(self.trainer)})
        self.previous = load_previous(hp.results_dir, self.run_config) if hp.resume else {}
        for split in self.previous:
            data.drop_split(split)
        self.split_names: list[str] = data.split_names
        if not self.split_names:  # resuming a finished run: Lightning runs no hook without a split, report here
            rank_zero_info(f"Every split is already in {hp.results_dir}/results.json: nothing left to evaluate.")
            if self.trainer.is_global_zero:
                self._new_report(Path(hp.results_dir)).finish(self.logger, hp.plots, self._lambda_spread())
            return
        check_data_fits(self.model_plan, data, self.expert_names, hp.mce_reference, list(self.methods), self.predicting)
        # Splits can differ in their classes (base-to-novel), a mix's sources too: one prompt set, and head, per class
        # list; each split's sources (itself, or a mix's) with their class names and labels.
        self.split_sources = {s: split_sources(s, data) for s in self.split_names}
        self.split_classnames = {s: mixed_or_plain(self.split_sources[s]) for s in self.split_names}
        adapt_set = self.adapt_on[2] if self.adapt_on is not None else None  # also when resume left it out
        sets, self.class_sets = class_sets(self.split_sources, adapt_set)
        if self.adapt_on is not None:
            self.adapt_on = (*self.adapt_on[:2], sets.index(adapt_set))
        self.class_counts = [len(names) for names, _ in sets]
        self.widths = {s: max(self.class_counts[c] for c in sets) for s, sets in self.class_sets.items()}
        merge_text = hp.merge_text if hp.merge_text is not None else len(self.expert_names) == 1
        loaded = self.model_plan.load(hp.context_init, merge_text)
        self.models_record = loaded.record
        tokenizer = self.model_plan.architecture.tokenizer()
        length = loaded.context_length  # a learned prompt context's: its heads from the context prompts
        contexts = None if length is None else [tokenizer(context_prompts(list(names), length)) for names, _ in sets]
        self.engine = TCubeEngine(
            loaded.pretrained,
            list(loaded.experts.values()),
            [tokenize_prompts(tokenizer, list(names), list(templates)) for names, templates in sets],
            self.class_counts,
            self.mapping,
            self.grid,
            merge_text,
            hp.samplewise,
            hp.compile,
            hp.heads,
            hp.head_tolerance,
            self.k_experts,
            self.expert_names,
            contexts,
        )
        labelled = [] if self.predicting else self.all_split_names  # predicting: no labels, no metrics
        labelled = [s for s in labelled if s in self.split_names]  # the splits resume left
        splits = {s: [(x.name, len(x.classnames), x.labels) for x in self.split_sources[s]] for s in labelled}
        self.metrics = RunMetrics(splits, list(self.methods))
        # Every sample's values (gathered from all processes at the split's end): exact, order-free statistics,
        # the quadrants, the analysis figures and the export.
        self.tables = {split: SampleTable() for split in self.split_names}
        self.rules: CalibratedRules | None = None
        """What the calibration split fixed (``data.calibration``), once it is finished: it is read first."""
        self.merging = {n: m.family not in NOT_MERGING for n, m in self.methods.items()}
        """Each method: whether it merges weights (its deferral by −JS too)."""

    def _all_methods(self) -> dict:
        """Every method with the ``model.grid`` copies, evaluated or not."""
        return with_grid(build_methods(self.baselines, self.hparams.arch or "", self.expert_names), list(self.grid))

    def on_test_start(self) -> None:
        """The engine's heads and fixed merges, once, on the device; the report of this run."""
        self._start()

    def _start(self) -> None:
        hp = self.hparams
        self.batches_seen = dict.fromkeys(self.split_names, 0)
        self.cost = CostMeter(self.device, models=len(self.expert_names) + 1)
        clustered = {n: m for n, m in self.methods.items() if m.is_clustered}
        self.clustered = ClusteredPass(clustered, self.split_names, list(self.engine.settings), hp.clusters)
        self.cluster_summaries: dict[str, dict] = {split: {} for split in self.split_names}
        self.evaluation = BatchEvaluation(self.engine, self.methods, self.weight_methods, self.cost)
        self.finished_splits = 0
        # trainer.log_dir is a collective call under DDP: every rank asks, here, once.
        self.report = self._new_report(Path(hp.results_dir or self.trainer.log_dir or self.trainer.default_root_dir))
        static_rules = {n: m.static_rule for n, m in self.methods.items() if m.is_static}
        extremes = hp.diagnose_extremes and "t3" in self.methods and len(self.expert_names) == 1
        path = self.engine.prepare(
            static_rules, extremes=extremes, weight_range=self.engine.weight_range(self.methods.values())
        )
        self.report.details["heads"] = self.engine.head_summary
        self.report.details["models"] = self.models_record
        self.report.details["samplewise"] = summary = self.engine.samplewise_summary()
        if self.trainer.datamodule.dicom_records:  # what reading each split's DICOM files applied
            self.report.details["dicom"] = self.trainer.datamodule.dicom_records
        self.adaptations: dict[str, dict] = {}
        if self.adapt_on is not None:  # once, on the split named; every split then uses what it learnt
            learnt = self._adapt(*self.adapt_on)
            self.adaptations = dict.fromkeys(self.split_names, learnt)
        if path == "loop" and any(m.per_sample for m in self.methods.values()):
            rank_zero_info(f"T³ sample-wise: the loop ({summary['reason']}).")

    def _new_report(self, results_dir: Path) -> RunReport:
        descriptions = {m.name: m.description for m in self.methods.values()}
        settings = (self.all_split_names, descriptions, self.run_config, self.hparams.mce_reference, self.previous)
        export, domains = self.hparams.export_samples, self.trainer.datamodule.domain_experts
        return RunReport(results_dir, *settings, export=export, experts=self.expert_names, domain_experts=domains)

    def _lambda_spread(self) -> tuple[float, tuple[float, float]] | None:
        """The λ-spread warning's threshold and λ's reachable range where T³ is evaluated, else None (no warning)."""
        if "t3" not in self.methods or len(self.expert_names) > 1:  # several experts: λ per expert, in results.md
            return None
        return self.hparams.min_lambda_spread, self.mapping.lambda_range()

    # ------------------------------------------------------------------ steps
    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, dataloader_idx)

    def _step(self, batch: dict, dataloader_idx: int) -> None:
        """One batch of a split through every method (``batches.BatchEvaluation``, plain torch), its results into the
        metrics, the split's per-sample table, the clustered methods' cache and the logger. Predicting, ``label`` is
        the row's number in its source (its identity)."""
        self._finish_splits_before(dataloader_idx)  # splits run one after another: earlier ones are done
        split = self.split_names[dataloader_idx]
        if self.adapted and self.adapt_on is None and self.batches_seen[split] == 0:  # before the split's first batch
            dataset = self.trainer.datamodule.datasets[split]
            self.adaptations[split] = self._adapt(split, dataset, self.class_sets[split][0])
        step, index = self.batch_position(split, batch["label"])
        result = self.evaluation(batch, self.class_sets[split], index)
        for group in result.groups:
            self.clustered.keep(split, group.columns["index"], group.shared, self.widths[split])
            self._record(split, group)
        if self.logger is not None:  # JS and λ of the whole batch; with several experts each one's T³ weight too
            log_batch_coefficients(self.logger, split, step, result.logged, self.trainer.is_global_zero)

    def _record(self, split: str, group: GroupResult) -> None:
        """A group's probabilities into each method's metrics (each row's source in a mix), its columns into the
        split's table; with a calibration split, each sample's conformal scores there and its sets elsewhere."""
        evaluated = not self.predicting and split != CALIBRATION
        if evaluated:
            for method, probs in group.probabilities.items():
                self.metrics.update(split, method, probs, group.labels, group.source)
        columns = group.columns
        if split == CALIBRATION:
            columns = columns | calibration_columns(group.probabilities, group.labels)
        elif self.rules is not None:
            labels = group.labels if evaluated else None  # predicting: a row's number, not its class
            columns = columns | set_columns(group.probabilities, self.rules, labels)
        self.tables[split].add(columns)

    def batch_position(self, split: str, labels: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The batch's index in the one-process order (processes read whole batches in turn, see WholeBatchSampler)
        and its samples' positions in the split: predicting, the rows' own numbers (unreadable rows are left out)."""
        step = self.batches_seen[split] * self.trainer.world_size + self.global_rank
        self.batches_seen[split] += 1
        first = step * self.trainer.datamodule.batch_size
        positions = first + torch.arange(len(labels), device=labels.device)
        return step, labels if self.predicting and split != CALIBRATION else positions

    def _adapt(self, split: str, dataset: torch.utils.data.Dataset, class_set: int) -> dict[str, dict]:
        logger = self.logger if self.trainer.is_global_zero else None
        settings, cost = self.adamerging, self.cost
        return adapt_methods(self.engine, self.adapted, split, dataset, class_set, settings, cost, logger, self._stop)

    def _stop(self) -> None:
        """Long work inside one batch (AdaMerging's adaptation) stops here when a SIGTERM came, as Lightning's loop
        stops between batches."""
        if self.trainer.received_sigterm:
            raise SIGTERMException

    # ------------------------------------------------------------- split ends
    def _finish_splits_before(self, index: int) -> None:
        """Finish every split before ``index``, in order, on every process, including those that got no batch
        of a split: each finish reduces across processes, so all must take part."""
        while self.finished_splits < index:
            self._finish_split(self.finished_splits)
            self.finished_splits += 1

    def _finish_split(self, index: int) -> None:
        """A split is done: second pass if needed, reduce its metrics (all ranks), rewrite the results files."""
        split = self.split_names[index]
        if not self.clustered.kept_any(split):  # no (readable) batch here: this process joins the gathers all the same
            self.clustered.keep_nothing(split, self.widths[split], self.device)
        if self.clustered.methods:
            self._second_pass(index)
        if split == CALIBRATION:  # the rules every later split is judged by, the same on every process
            self.rules = calibrate(self.tables[split].gather(), self.merging, *vars(self.guarantee).values())
            self.report.details["calibration"] = {"data": self.trainer.datamodule.calibration, **self.rules.record()}
            rank_zero_info(f"Calibrated on {self.rules.samples} samples ({self.trainer.datamodule.calibration})")
            return
        if self.predicting:
            self._write_predictions(split)
            return
        metrics, by_source = self.metrics.compute(split)
        table = self.tables[split].gather()
        table |= coverage_columns(table, list(self.methods))  # each sample's place in each deferral order
        total = len(self.trainer.datamodule.datasets[split])
        adaptation, classnames = self.adaptations.get(split, {}), self.split_classnames[split]
        clusters, grid, experts = self.cluster_summaries[split], list(self.grid), self.expert_names
        record = split_record(metrics, table, grid, total, clusters, adaptation, classnames, experts)
        record["deferral"] = deferral(table, list(self.methods))
        record["guarantee"] = {} if self.rules is None else guarantee_record(table, self.rules, self.merging)
        if self.rules is not None:
            table |= accepted_columns(table, self.rules, self.merging)  # each sample's decision, for the export
        if by_source:  # a mix: the same metrics for each source split's samples in it
            record["sources"] = mix_record(by_source, table)
            for position, source in enumerate(record["sources"].values()):
                rows = {name: values[table["source"] == position] for name, values in table.items()}
                source["guarantee"] = {} if self.rules is None else guarantee_record(rows, self.rules, self.merging)
        if self.trainer.is_global_zero:
            self._remove_replaced_run()
            self.report.add_split(split, record, table)
        self.results_written = True

    def _second_pass(self, index: int) -> None:
        """The clustered methods on split ``index``: the mixtures fitted (every process takes part), then the batches
        pass 1 read (Lightning's limit_test_batches / fast_dev_run stop it early) again, into the metrics and table.
        Under the trainer's precision (e.g. bf16 autocast), like test_step: this pass may run from an epoch hook."""
        split = self.split_names[index]
        fit = self.clustered.fit(split, self.global_rank)
        for note in fit.notes:
            rank_zero_warn(note)
        self.cluster_summaries[split] = fit.summaries
        loaders = self.trainer.predict_dataloaders if self.predicting else self.trainer.test_dataloaders
        offset = 0
        with self.trainer.precision_plugin.test_step_context():
            for batch in itertools.islice(loaders[index], self.batches_seen[split]):
                batch = readable_rows(self.transfer_batch_to_device(batch, self.device, index))
                if not len(batch["label"]):  # predict: a batch of images none of which could be read
                    continue
                for group in self.clustered.predict(self.engine, batch, self.class_sets[split], fit, offset, self.cost):
                    self._record(split, group)
                    offset += len(group.labels)

    def _remove_replaced_run(self) -> None:
        """With overwrite, before this run writes its first results (rank 0): every file the run it replaces wrote."""
        if self.hparams.overwrite and not self.results_written:
            clear_earlier_run(self.report.results_dir, self.started)

    def on_test_epoch_end(self) -> None:
        """Finish the last split(s), then report on rank 0."""
        self._finish_splits_before(len(self.split_names))
        if self.trainer.is_global_zero:
            self.report.finish(self.logger, self.hparams.plots, self._lambda_spread(), self.cost.table())
