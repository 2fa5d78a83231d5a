"""A finished split's record, as results.json holds it: its metrics per method, λ and JS statistics, the decision
quadrants, a mix's metrics per source split; from numbers already reduced across processes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tcube_lightning.reporting.diagnostics import decision_diagnostics, mean
from tcube_lightning.reporting.samples import lambda_column

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
    "guarantee",
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
