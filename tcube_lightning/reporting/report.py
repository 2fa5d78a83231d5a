"""What a run reports: each finished split's record, the results files rewritten once per split, an earlier run's
records for resume, and at the end the logger's final metrics, the plots, warnings and the console table.

It runs on rank 0 with numbers already reduced across processes; it computes no metric of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tcube_lightning.errors import InputError
from tcube_lightning.merging.adamerging import Adaptation
from tcube_lightning.merging.coefficients import BetaMixture
from tcube_lightning.reporting.console import print_summary
from tcube_lightning.reporting.cost import SHARED
from tcube_lightning.reporting.diagnostics import decision_diagnostics, lambda_spread_warning, mean
from tcube_lightning.reporting.plots import ExpertRouting, render_figures, run_figures, save_images
from tcube_lightning.reporting.results import (
    corruption_errors,
    normalised_accuracy,
    npz_bytes,
    summary_rows,
    write_atomic,
    write_results,
    write_summary,
)
from tcube_lightning.reporting.samples import flatten_tables, is_analysis_column, lambda_column, read_tables

SPLIT_RECORD_KEYS = (
    "accuracy",
    "metrics",
    "coefficients",
    "diagnostics",
    "num_samples",
    "nonfinite_samples",
    "clusters",
    "adaptation",
    "classnames",
    "deferral",
)
"""What results.json holds per split, each key mapping split → value."""


def lambda_statistics(lam: np.ndarray) -> dict[str, float]:
    """Range, spread and mean of a split's λ. ``math.fsum`` rounds the exact sum once, so the mean does not depend
    on how the samples were spread over processes."""
    values = lam.flatten().tolist()
    low, high = min(values), max(values)
    mean_value = math.fsum(values) / len(values)
    return {"lambda_min": low, "lambda_max": high, "lambda_spread": high - low, "lambda_mean": mean_value}


def coefficient_statistics(table: dict[str, np.ndarray], grid: list[str], experts: list[str]) -> dict:
    """A split's λ statistics and mean JS; with ``grid``, under "grid" those of each ``model.grid`` setting. With
    several experts, under "experts" each one's (its λ, JS with the generalist and mean T³ weight, where T³ ran), and
    the mean generalised JS of all of them with the generalist."""
    if len(experts) > 1:
        return {
            "generalised_js_mean": mean(table["js"]),
            "experts": {e: expert_statistics(table, grid, e) for e in experts},
        }
    statistics = {**lambda_statistics(table["lambda"]), "js_mean": mean(table["js"])}
    if grid:
        statistics["grid"] = {label: lambda_statistics(table[lambda_column(label)]) for label in grid}
    return statistics


def expert_statistics(table: dict[str, np.ndarray], grid: list[str], expert: str) -> dict:
    """One expert's λ statistics, mean JS and mean T³ weight w_k(x) in a split of a run with several experts."""
    statistics = {**lambda_statistics(table[f"lambda/{expert}"]), "js_mean": mean(table[f"js/{expert}"])}
    if f"w/t3/{expert}" in table:
        statistics["weight_mean"] = mean(table[f"w/t3/{expert}"])
    if grid:
        statistics["grid"] = {label: lambda_statistics(table[f"{lambda_column(label)}/{expert}"]) for label in grid}
    return statistics


def split_record(
    metrics: dict[str, dict[str, float]],
    table: dict[str, np.ndarray],
    grid: list[str],
    total_samples: int,
    clusters: dict[str, dict],
    adaptation: dict[str, dict],
    classnames: list[str],
    experts: list[str],
) -> dict[str, Any]:
    """A finished split's record (``SPLIT_RECORD_KEYS`` and its total sample count) from its reduced metrics, by
    method, and its gathered per-sample table; the decision quadrants are the generalist's and one expert's."""
    return {
        "accuracy": {method: values["top1"] for method, values in metrics.items()},
        "metrics": metrics,
        "coefficients": coefficient_statistics(table, grid, experts),
        "diagnostics": decision_diagnostics(table) if len(experts) == 1 else {},
        "num_samples": len(table["index"]),
        "total_samples": total_samples,
        "nonfinite_samples": int((~table["finite"]).sum()),
        "clusters": clusters,
        "adaptation": adaptation,
        "classnames": classnames,
    }


def mix_record(by_source: dict[str, dict[str, dict[str, float]]], table: dict[str, np.ndarray]) -> dict[str, dict]:
    """A mixed split's metrics per source split (``by_source``: source → method → metrics) with each source's sample
    count in the mix: what each method scored on the same images inside the stream."""
    return {
        source: {
            "accuracy": {method: values["top1"] for method, values in metrics.items()},
            "metrics": metrics,
            "num_samples": int((table["source"] == position).sum()),
        }
        for position, (source, metrics) in enumerate(by_source.items())
    }


def mixture_summary(mixture: BetaMixture) -> dict:
    """A fitted mixture as plain numbers for results.json."""
    summary = {"means": mixture.means.tolist(), "weights": mixture.weights.tolist()}
    summary.update(a=mixture.a.tolist(), b=mixture.b.tolist())
    return summary | ({"note": mixture.note} if mixture.note else {})


RESUME_IGNORES = {
    "model": ("results_dir", "plots", "samplewise", "compile", "cache_dir", "min_lambda_spread"),
    "data": ("num_workers", "pin_memory", "corruption_cache"),
    "trainer": (),
}
"""Settings that do not change a run's numbers (where files go, how fast, what is drawn or warned about; the
sample-wise paths and compiled forwards agree to float rounding): resume accepts an earlier run that differs in
these. Every other model and data setting must be the same, and so must the Trainer's that change numbers
(``NUMERIC_TRAINER_SETTINGS``)."""
NUMERIC_TRAINER_SETTINGS = ("precision", "deterministic", "benchmark")
"""The Trainer's settings that change a run's numbers (recorded in results.json's config.trainer): its precision
(bf16 and float32 logits differ), deterministic algorithms and cuDNN's benchmark (another kernel, other rounding). The
process and device counts do not: 1 and N processes give the same results."""


def trainer_settings(trainer: Trainer) -> dict[str, Any]:
    """The Trainer's settings that change a run's numbers (``NUMERIC_TRAINER_SETTINGS``), as this run has them."""
    return {
        "precision": str(trainer.precision),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "benchmark": bool(torch.backends.cudnn.benchmark),
    }


def resume_relevant(config: dict) -> dict:
    """The part of a run's configuration that resume compares: without ``RESUME_IGNORES``, data.root resolved."""
    relevant = {}
    for group, ignored in RESUME_IGNORES.items():
        relevant[group] = {k: v for k, v in config.get(group, {}).items() if k not in ignored}
    if relevant["data"].get("root") is not None:
        relevant["data"]["root"] = str(Path(relevant["data"]["root"]).resolve())
    return relevant


def read_results(path: Path) -> dict[str, Any]:
    """An earlier run's results.json, checked to hold what resume needs; a clear error naming the file if not."""
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"model.resume: {path} is not valid JSON ({err})") from err
    if not isinstance(results, dict):
        raise InputError(f"model.resume: {path} holds a {type(results).__name__}, not a tcube-lightning results object")
    missing = [key for key in ("config", *SPLIT_RECORD_KEYS) if not isinstance(results.get(key), dict)]
    if missing:
        raise InputError(f"model.resume: {path} lacks {missing}: it was not written by a tcube-lightning run")
    incomplete = [
        f"{key}[{split!r}]" for split in results["accuracy"] for key in SPLIT_RECORD_KEYS if split not in results[key]
    ]
    if incomplete:
        raise InputError(f"model.resume: {path} lacks {incomplete[:5]}: the file was edited or cut")
    return results


def load_previous(results_dir: str | Path, run_config: dict) -> dict[str, dict]:
    """For resume: the split records (and per-sample tables, for the plots) of an earlier run with the same
    numbers-relevant configuration, from results.json and analysis.npz in ``results_dir``."""
    path = Path(results_dir) / "results.json"
    if not path.is_file():
        return {}
    previous = read_results(path)
    old, new = resume_relevant(previous["config"]), resume_relevant(run_config)
    if "trainer" not in previous["config"]:  # written before the Trainer's settings were recorded: not known
        new["trainer"] = old["trainer"]
    if old != new:
        differing = sorted(
            f"{group}.{key}"
            for group in RESUME_IGNORES
            for key in set(old[group]) | set(new[group])
            if old[group].get(key) != new[group].get(key)
        )
        raise InputError(
            f"model.resume: {path} was written with another configuration (differs in {differing}); "
            "use another model.results_dir or remove that file"
        )
    done = [split for split in previous["accuracy"] if split not in previous.get("partial_splits", {})]
    rank_zero_info(f"Resuming: {len(done)} split(s) already in {path} are skipped: {done}")
    tables = read_tables(Path(results_dir) / ANALYSIS_FILE)
    return {
        split: Previous(
            {key: previous[key][split] for key in SPLIT_RECORD_KEYS}
            | ({"sources": previous["sources"][split]} if split in previous.get("sources", {}) else {}),
            tables.get(split),
        )
        for split in done
    }


ANALYSIS_FILE = "analysis.npz"
"""Every finished split's per-sample analysis columns (``samples.is_analysis_column``), beside results.json: the
plots of a resumed run cover every split."""
EXPORT_FOLDER = "samples"
"""With ``model.export_samples``: one npz per split, every per-sample column (``samples.py``)."""


class Previous(dict):
    """A split record read back for resume, with the split's per-sample table (None if analysis.npz lacked it)."""

    def __init__(self, record: dict, table: dict[str, np.ndarray] | None) -> None:
        super().__init__(record)
        self.table = table


class RunReport:
    """The records of a run's finished splits and everything written from them.

    Args:
        results_dir: Where results.json, results.md, summary.* and plots/ go.
        split_order: Every split of the run, in protocol order (the order of the files' columns).
        methods: Column name → description of every evaluated method.
        run_config: The run's configuration, stored in results.json (and compared on resume).
        mce_reference: The method whose errors normalise CE and mCE.
        previous: Records of the splits an earlier run finished (resume).
        export: Write every split's per-sample table to ``samples/<split>.npz``.
        experts: The experts' names (one: ``expert``); with several the summary takes FusionBench's layout.
        domain_experts: Each split's domain expert (``data.expert_of``): the normalised accuracy's reference.
    """

    def __init__(
        self,
        results_dir: Path,
        split_order: list[str],
        methods: dict[str, str],
        run_config: dict,
        mce_reference: str,
        previous: dict[str, dict] | None = None,
        export: bool = False,
        experts: list[str] | None = None,
        domain_experts: dict[str, str] | None = None,
    ) -> None:
        self.results_dir, self.split_order, self.methods = results_dir, split_order, methods
        self.run_config, self.mce_reference = run_config, mce_reference
        self.records: dict[str, dict] = dict(previous or {})
        self.details: dict[str, Any] = {}
        """Run-level facts for results.json (e.g. how the zero-shot heads were computed)."""
        self.tables = {s: r.table for s, r in (previous or {}).items() if getattr(r, "table", None) is not None}
        self.export = export
        self.experts, self.domain_experts = list(experts or ["expert"]), dict(domain_experts or {})

    def add_split(self, split: str, record: dict[str, Any], table: dict[str, np.ndarray]) -> None:
        """A split is finished: keep its record and per-sample analysis columns, write its per-sample export if
        asked, and rewrite the results files (atomically), so that an interrupted run keeps every split it finished."""
        self.records[split] = record
        self.tables[split] = {name: values for name, values in table.items() if is_analysis_column(name)}
        if self.export:
            write_atomic(self.results_dir / EXPORT_FOLDER / f"{split}.npz", npz_bytes(table))
        self.write()

    def results(self) -> dict[str, Any]:
        """Everything finished so far, per key, splits in protocol order; ``complete`` and ``missing_splits`` say
        what an interrupted run still lacks."""
        order = [s for s in self.split_order if s in self.records]
        results: dict[str, Any] = {key: {s: self.records[s][key] for s in order} for key in SPLIT_RECORD_KEYS}
        mixes = {s: self.records[s]["sources"] for s in order if "sources" in self.records[s]}
        if mixes:  # each mixed split's metrics per source split
            results["sources"] = mixes
        results["methods"] = dict(self.methods)
        results["config"] = self.run_config
        results.update(self.details)
        results["missing_splits"] = [s for s in self.split_order if s not in self.records]
        results["partial_splits"] = partial_splits(self.records)
        results["complete"] = not results["missing_splits"] and not results["partial_splits"]
        errors = corruption_errors(results["accuracy"], self.mce_reference)
        if errors:
            results["corruption_errors"] = {"reference": self.mce_reference, "ce": errors}
        if self.domain_experts:
            results["expert_of"] = self.domain_experts
            results["normalised_accuracy"] = normalised_accuracy(
                results["accuracy"], self.domain_experts, results.get("sources", {}), self.experts
            )
        return results

    def write(self) -> tuple[Path, Path]:
        results = self.results()
        paths = write_results(self.results_dir, results)
        write_summary(self.results_dir, self.summary_rows(results), results["missing_splits"])
        order = [s for s in self.split_order if s in self.tables]
        write_atomic(self.results_dir / ANALYSIS_FILE, npz_bytes(flatten_tables({s: self.tables[s] for s in order})))
        return paths

    def summary_rows(self, results: dict) -> list[dict]:
        errors = results.get("corruption_errors", {}).get("ce", {})
        partial, missing = results.get("partial_splits", {}), results["missing_splits"]
        normalised = results.get("normalised_accuracy", {}) if len(self.experts) > 1 else None
        return summary_rows(results["accuracy"], errors, partial, missing, results.get("deferral"), normalised)

    def finish(
        self,
        logger: Logger | None,
        plots: bool,
        lambda_spread: tuple[float, tuple[float, float]] | None,
        cost: dict | None = None,
    ) -> None:
        """The end of the run: final metrics to the logger, warnings, plots (those per split for every split with a
        per-sample table, a resumed run's earlier splits included), what each method cost (``cost``: cost.json, the
        logger, a column of the table), the console table. ``lambda_spread``: the λ-spread warning's threshold and
        the λ range the settings allow; None skips that check."""
        results = self.results()
        if logger is not None:
            log_final_metrics(logger, results["metrics"], self.run_config)
        rows = self.summary_rows(results)
        if cost:
            write_atomic(self.results_dir / "cost.json", json.dumps(cost, indent=2) + "\n")
            if logger is not None:
                scalars = {f"cost/{part}/{key}": value for part, row in cost.items() for key, value in row.items()}
                logger.log_metrics(scalars, step=0)
            rows = [{**row, "ms/img": cost.get(row["method"], {}).get("ms_per_image", math.nan)} for row in rows]
        if results["partial_splits"]:
            rank_zero_warn(partial_note(results["partial_splits"]))
        affected = {s: n for s, n in results["nonfinite_samples"].items() if n}
        if affected:
            rank_zero_warn(
                f"non-finite logits from the pretrained or expert model for {sum(affected.values())} sample(s) "
                f"(per split: {affected}); their JS was set to 0. Check the inputs and checkpoints."
            )
        if lambda_spread is not None:
            warning = lambda_spread_warning(results["coefficients"], *lambda_spread)
            if warning:
                rank_zero_warn(warning)
        if plots:
            tables = {s: self.tables[s] for s in results["accuracy"] if s in self.tables}
            mixes = {split: list(sources) for split, sources in results.get("sources", {}).items()}
            routing = ExpertRouting(self.experts, self.domain_experts, mixes)
            plot(self.results_dir / "plots", logger, results["accuracy"], tables, results["diagnostics"], routing)
        print_summary(rows, "Top-1 accuracy (%)")
        if cost and SHARED in cost:
            rank_zero_info(
                f"ms/img: each method's own time, beyond the shared pretrained and expert forwards with JS and λ "
                f"({cost[SHARED]['ms_per_image']:.2f} ms/img); forward-equivalents in {self.results_dir / 'cost.json'}"
            )
        rank_zero_info(
            f"Results written to {self.results_dir / 'results.json'}, {self.results_dir / 'results.md'} "
            "(every split) and summary.md/csv/json beside them"
        )


def partial_splits(records: dict[str, dict]) -> dict[str, dict[str, int]]:
    """Splits evaluated on fewer samples than they hold (Lightning's limit_test_batches or fast_dev_run): split →
    evaluated and total sample counts."""
    return {
        split: {"evaluated": record["num_samples"], "total": record["total_samples"]}
        for split, record in records.items()
        if record.get("total_samples", record["num_samples"]) > record["num_samples"]
    }


def partial_note(partial: dict[str, dict[str, int]]) -> str:
    counts = ", ".join(f"{split} {n['evaluated']} of {n['total']}" for split, n in partial.items())
    return (
        f"partial results: fewer samples were evaluated than the splits hold ({counts}; trainer.limit_test_batches or "
        "fast_dev_run): results.json says complete: false, and resume evaluates these splits again"
    )


def log_batch_coefficients(
    logger: Logger, split: str, step: int, values: dict[str, torch.Tensor], histograms: bool
) -> None:
    """A batch's λ and JS as ``{split}/{name}_{mean,min,max}`` scalars at ``step`` (the batch's index in the
    one-process order) and, with TensorBoard and ``histograms`` (rank 0), as histograms."""
    scalars = {
        f"{split}/{name}_{stat}": float(getattr(v, stat)())
        for name, v in values.items()
        for stat in ("mean", "min", "max")
    }
    logger.log_metrics(scalars, step=step)
    if isinstance(logger, TensorBoardLogger) and histograms:
        for name, v in values.items():
            logger.experiment.add_histogram(f"{split}/{name}", v.float().cpu(), step)


def log_adaptation(logger: Logger, split: str, method: str, adaptation: Adaptation) -> None:
    """AdaMerging's entropy at every step as ``{split}/{method}/entropy`` and, with TensorBoard, a histogram of the
    coefficients it learnt (one per image-tower tensor, layer-wise)."""
    for step, value in enumerate(adaptation.entropy):
        logger.log_metrics({f"{split}/{method}/entropy": value}, step=step)
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_histogram(f"{split}/{method}/coefficients", adaptation.coefficients.float().cpu(), 0)


def log_final_metrics(logger: Logger, metrics: dict[str, dict[str, dict[str, float]]], run_config: dict) -> None:
    """Every split's metrics per method as scalars ``{split}/{metric}/{method}``; with TensorBoard also in its
    HPARAMS tab beside the run's configuration, so that runs (a γ sweep, say) can be compared there."""
    final = {
        f"{split}/{name}/{method}": value
        for split, per_method in metrics.items()
        for method, values in per_method.items()
        for name, value in values.items()
    }
    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(run_config, metrics=final, step=0)
    else:
        logger.log_metrics(final, step=0)


def plot(
    folder: Path,
    logger: Logger | None,
    accuracy: dict[str, dict[str, float]],
    tables: dict[str, dict[str, np.ndarray]],
    diagnostics: dict[str, dict],
    routing: ExpertRouting,
) -> None:
    """PNG files in ``folder``, and the same images in TensorBoard."""
    images = render_figures(run_figures(accuracy, tables, diagnostics, routing))
    save_images(folder, images)
    if isinstance(logger, TensorBoardLogger):
        for stem, image in images.items():
            logger.experiment.add_image(f"plots/{stem}", image, dataformats="HWC")
