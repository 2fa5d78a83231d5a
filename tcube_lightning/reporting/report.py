"""What a run reports: each finished split's record (``records``) kept, the results files rewritten once per split,
and at the end the logger's final metrics (``logged``), the plots, warnings and the console table.

It runs on rank 0 with numbers already reduced across processes; it computes no metric of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tcube_lightning.merging.methods import EXTENSION
from tcube_lightning.reporting.console import print_summary
from tcube_lightning.reporting.cost import SHARED
from tcube_lightning.reporting.diagnostics import lambda_spread_warning
from tcube_lightning.reporting.logged import log_final_metrics, plot
from tcube_lightning.reporting.plots import ExpertRouting
from tcube_lightning.reporting.records import SPLIT_RECORD_KEYS
from tcube_lightning.reporting.results import (
    corruption_errors,
    guarantee_columns,
    normalised_accuracy,
    npz_bytes,
    summary_rows,
    write_atomic,
    write_results,
    write_summary,
)
from tcube_lightning.reporting.resume import ANALYSIS_FILE
from tcube_lightning.reporting.samples import flatten_tables, is_analysis_column

EXPORT_FOLDER = "samples"
"""With ``model.export_samples``: one npz per split, every per-sample column (``samples.py``)."""


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
        note = extension_note(results.get("methods", {}))
        paths = write_results(self.results_dir, results, note)
        write_summary(self.results_dir, self.summary_rows(results), results["missing_splits"], note)
        order = [s for s in self.split_order if s in self.tables]
        write_atomic(self.results_dir / ANALYSIS_FILE, npz_bytes(flatten_tables({s: self.tables[s] for s in order})))
        return paths

    def summary_rows(self, results: dict) -> list[dict]:
        errors = results.get("corruption_errors", {}).get("ce", {})
        partial, missing = results.get("partial_splits", {}), results["missing_splits"]
        normalised = results.get("normalised_accuracy", {}) if len(self.experts) > 1 else None
        mixes = list(results.get("sources", {}))
        rows = summary_rows(results["accuracy"], errors, partial, missing, results.get("deferral"), normalised, mixes)
        return guarantee_columns(rows, results)

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
        rows = self.summary_rows(results)
        note = extension_note(results.get("methods", {}))
        if cost:
            write_atomic(self.results_dir / "cost.json", json.dumps(cost, indent=2) + "\n")
            rows = [{**row, "ms/img": cost.get(row["method"], {}).get("ms_per_image", math.nan)} for row in rows]
        if logger is not None:  # the run's tables as text panels, not a chart per number
            summary = self.results_dir / "summary.md"
            tables = {"results": summary.read_text()} if summary.is_file() else {}
            if cost:
                tables["cost"] = cost_markdown(cost)
            log_final_metrics(logger, results["accuracy"], self.run_config, self.experts, tables)
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
            calibrated = results.get("calibration")
            guarantee = (
                None if not calibrated else (results["guarantee"], results.get("sources", {}), calibrated["alpha"])
            )
            plot(
                self.results_dir / "plots",
                logger,
                results["accuracy"],
                tables,
                results["diagnostics"],
                routing,
                guarantee,
                note,
            )
        print_summary(rows, "Top-1 accuracy (%)")
        if note:
            rank_zero_info(note)
        if cost and SHARED in cost:
            rank_zero_info(
                f"ms/img: each method's own time, beyond the shared pretrained and expert forwards with JS and λ "
                f"({cost[SHARED]['ms_per_image']:.2f} ms/img); forward-equivalents in {self.results_dir / 'cost.json'}"
            )
        rank_zero_info(
            f"Results written to {self.results_dir / 'results.json'}, {self.results_dir / 'results.md'} "
            "(every split) and summary.md/csv/json beside them"
        )


def extension_note(descriptions: dict[str, str]) -> str | None:
    """The line under an accuracy table that names its columns that are T³ with several experts, so that nobody reads
    them as the paper's method; None where there are none."""
    ours = [method for method, description in descriptions.items() if EXTENSION in description]
    if not ours:
        return None
    return (
        f"{', '.join(ours)}: T³ with several experts, our extension of the paper (which merges one generalist with one "
        "expert); see docs/experts.md."
    )


def cost_markdown(cost: dict[str, dict[str, float]]) -> str:
    """cost.json as a Markdown table (for TensorBoard's text panel)."""
    lines = ["| part | ms per image | forward-equivalents |", "|---|---:|---:|"]
    lines += [
        f"| {part} | {row['ms_per_image']:.2f} | {row['forward_equivalents']:.2f} |" for part, row in cost.items()
    ]
    return "\n".join(lines) + "\n"


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
