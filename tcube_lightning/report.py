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
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tcube_lightning.coefficients import BetaMixture
from tcube_lightning.console import print_summary
from tcube_lightning.diagnostics import lambda_spread_warning
from tcube_lightning.errors import InputError
from tcube_lightning.plots import close_figures, run_figures, save_figures
from tcube_lightning.results import corruption_errors, summary_rows, write_results, write_summary

SPLIT_RECORD_KEYS = (
    "accuracy", "metrics", "coefficients", "diagnostics", "num_samples", "nonfinite_samples", "clusters",
)  # fmt: skip
"""What results.json holds per split, each key mapping split → value."""


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


def load_previous(results_dir: str | Path, run_config: dict) -> dict[str, dict]:
    """For resume: the split records an earlier run with the same configuration wrote to results.json."""
    path = Path(results_dir) / "results.json"
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"model.resume: {path} is not valid JSON ({err})") from err
    if previous.get("config") != run_config:
        old, new = previous.get("config", {}), run_config
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


class RunReport:
    """The records of a run's finished splits and everything written from them.

    Args:
        results_dir: Where results.json, results.md, summary.* and plots/ go.
        split_order: Every split of the run, in protocol order (the order of the files' columns).
        methods: Column name → description of every evaluated method.
        run_config: The run's configuration, stored in results.json (and compared on resume).
        mce_reference: The method whose errors normalise CE and mCE.
        previous: Records of the splits an earlier run finished (resume).
    """

    def __init__(
        self,
        results_dir: Path,
        split_order: list[str],
        methods: dict[str, str],
        run_config: dict,
        mce_reference: str,
        previous: dict[str, dict] | None = None,
    ) -> None:
        self.results_dir, self.split_order, self.methods = results_dir, split_order, methods
        self.run_config, self.mce_reference = run_config, mce_reference
        self.records: dict[str, dict] = dict(previous or {})

    def add_split(self, split: str, record: dict[str, Any]) -> None:
        """A split is finished: keep its record and rewrite the results files (atomically), so that an
        interrupted run keeps every split it finished."""
        self.records[split] = record
        self.write()

    def results(self) -> dict[str, Any]:
        """Everything finished so far, per key, splits in protocol order; ``complete`` and ``missing_splits`` say
        what an interrupted run still lacks."""
        order = [s for s in self.split_order if s in self.records]
        results: dict[str, Any] = {key: {s: self.records[s][key] for s in order} for key in SPLIT_RECORD_KEYS}
        results["methods"] = dict(self.methods)
        results["config"] = self.run_config
        results["missing_splits"] = [s for s in self.split_order if s not in self.records]
        results["complete"] = not results["missing_splits"]
        errors = corruption_errors(results["accuracy"], self.mce_reference)
        if errors:
            results["corruption_errors"] = {"reference": self.mce_reference, "ce": errors}
        return results

    def write(self) -> tuple[Path, Path]:
        results = self.results()
        paths = write_results(self.results_dir, results)
        write_summary(self.results_dir, self.summary_rows(results))
        return paths

    @staticmethod
    def summary_rows(results: dict) -> list[dict]:
        return summary_rows(results["accuracy"], results.get("corruption_errors", {}).get("ce", {}))

    def finish(
        self,
        logger: Logger | None,
        lambda_arrays: dict[str, np.ndarray] | None,
        min_lambda_spread: float | None,
    ) -> None:
        """The end of the run: final metrics to the logger, warnings, plots (with ``lambda_arrays``, the split's
        per-sample λ), the console table. ``min_lambda_spread`` None skips the λ-spread check (no T³)."""
        results = self.results()
        if logger is not None:
            log_final_metrics(logger, results["metrics"], self.run_config)
        affected = {s: n for s, n in results["nonfinite_samples"].items() if n}
        if affected:
            rank_zero_warn(
                f"non-finite logits from the pretrained or expert model for {sum(affected.values())} sample(s) "
                f"(per split: {affected}); their JS was set to 0. Check the inputs and checkpoints."
            )
        if min_lambda_spread is not None:
            warning = lambda_spread_warning(results["coefficients"], min_lambda_spread)
            if warning:
                rank_zero_warn(warning)
        if lambda_arrays is not None:
            plot(self.results_dir / "plots", logger, results["accuracy"], lambda_arrays)
        print_summary(self.summary_rows(results), "Top-1 accuracy (%)")
        rank_zero_info(
            f"Results written to {self.results_dir / 'results.json'}, {self.results_dir / 'results.md'} "
            "(every split) and summary.md/csv/json beside them"
        )


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
    folder: Path, logger: Logger | None, accuracy: dict[str, dict[str, float]], lambdas: dict[str, np.ndarray]
) -> None:
    """PNG files in ``folder``, and the same figures as TensorBoard images."""
    figures = run_figures(accuracy, lambdas)
    save_figures(folder, figures)
    if isinstance(logger, TensorBoardLogger):
        for stem, figure in figures.items():
            logger.experiment.add_figure(f"plots/{stem}", figure, close=False)
    close_figures(figures)
