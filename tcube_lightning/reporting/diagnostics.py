"""Per-split diagnostics of T³'s coefficient from the split's per-sample table (``samples.py``): the paper's decision
quadrants with their JS and the correlation of JS with DaWin's entropy ratio, and λ's reach."""

from __future__ import annotations

import math

import numpy as np

QUADRANTS = ("both wrong", "only expert right", "only pretrained right", "both right")


def quadrant_indices(table: dict[str, np.ndarray]) -> np.ndarray:
    """Each sample's quadrant, an index into ``QUADRANTS``: 2·(pretrained right) + (expert right)."""
    label = table["label"]
    return 2 * (table["pred/zeroshot"] == label).astype(int) + (table["pred/expert"] == label).astype(int)


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's ρ in float64; None where it is undefined (fewer than two samples, or a constant variable)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or x.min() == x.max() or y.min() == y.max():
        return None
    return float(np.corrcoef(x, y)[0, 1])


def mean(values: np.ndarray) -> float:
    """The mean from the exactly rounded sum (``math.fsum``): independent of the order samples arrived in."""
    return math.fsum(values.tolist()) / len(values) if len(values) else math.nan


def decision_diagnostics(table: dict[str, np.ndarray]) -> dict:
    """Per quadrant (pretrained right/wrong × expert right/wrong): the count, mean JS and Pearson's ρ between JS
    and DaWin's entropy ratio (the paper's Figure 2); with the λ-extremes diagnostic, how many samples change
    prediction between the models merged at λ_min and λ_max."""
    quadrant = quadrant_indices(table)
    quadrants = {}
    for index, name in enumerate(QUADRANTS):
        rows = quadrant == index
        quadrants[name] = {
            "count": int(rows.sum()),
            "js_mean": mean(table["js"][rows]),
            "pearson_js_dawin": pearson(table["js"][rows], table["w/dawin"][rows]),
        }
    diagnostics: dict = {"quadrants": quadrants}
    if "flip" in table:
        diagnostics["flips_between_lambda_extremes"] = int(table["flip"].sum())
    return diagnostics


def lambda_spread_warning(
    coefficients: dict[str, dict[str, float]], min_spread: float, reachable: tuple[float, float]
) -> str | None:
    """One warning naming the splits where λ barely moves (T³ then acts like a fixed interpolation), or None.
    ``reachable`` is the λ range the run's settings allow at all."""
    narrow = {
        split: stats["lambda_max"] - stats["lambda_min"]
        for split, stats in coefficients.items()
        if stats["lambda_max"] - stats["lambda_min"] < min_spread
    }
    if not narrow:
        return None
    listed = ", ".join(f"{split} ({spread:.4f})" for split, spread in list(narrow.items())[:8])
    more = f" and {len(narrow) - 8} more" if len(narrow) > 8 else ""
    said = f"λ spans less than min_lambda_spread={min_spread} on {len(narrow)} split(s): {listed}{more}. "
    if reachable[0] == reachable[1]:  # no γ can widen it
        return said + f"lambda_min = lambda_max = {reachable[0]:.4f}: T³ is a fixed interpolation at that weight."
    return said + (
        f"T³ behaves almost like a fixed interpolation there: with these settings λ can only move within "
        f"[{reachable[0]:.4f}, {reachable[1]:.4f}], as σ(γ·JS) lies in [0.5, σ(γ·ln 2)]. A larger gamma or a wider "
        "range [lambda_min, lambda_max] widens it; model.grid evaluates several settings in one pass, on the same "
        "forwards (e.g. --model.grid='[{gamma: 4}, {gamma: 16}]')."
    )
