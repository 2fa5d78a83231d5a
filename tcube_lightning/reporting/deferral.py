"""Deferral (selective classification, Geifman & El-Yaniv, "Selective classification for deep neural networks",
NeurIPS 2017): hand the samples a score ranks least trustworthy to a person, and keep the rest.

Per method and split, two scores rank the samples, most trustworthy first: the method's own top probability, and the
JS divergence between the two models (low first: the generalist and the expert agree; the same ranking for every
method). Keeping the first k of n samples covers k/n of them at a selective risk of their error rate; the
risk–coverage curve runs over k = 1..n, its area (AURC) is the mean of the n risks, and the accuracy at a coverage c
is that of the first ⌈c·n⌉ samples. Ties keep the split's own order (a stable sort over the gathered table), so 1 and
N processes give the same numbers.
"""

from __future__ import annotations

import math

import numpy as np

COVERAGES = (0.8, 0.9, 0.95)
SCORES = ("confidence", "js")
"""``confidence``: the method's own top probability; ``js``: low JS between the two models first."""


def ranking(table: dict[str, np.ndarray], method: str, score: str) -> np.ndarray:
    """The samples' order, most trustworthy first."""
    trust = table[f"prob/{method}"].astype(np.float64) if score == "confidence" else -table["js"].astype(np.float64)
    return np.argsort(-trust, kind="stable")


def selective_risks(correct: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The error rate of the first k samples of ``order``, for k = 1..n."""
    errors = np.cumsum(~correct[order])
    return errors / np.arange(1, len(order) + 1)


def deferral(table: dict[str, np.ndarray], methods: list[str]) -> dict[str, dict[str, dict]]:
    """Per method and score: AURC and the accuracy at each of ``COVERAGES``."""
    record: dict[str, dict[str, dict]] = {}
    for method in methods:
        correct = table[f"pred/{method}"] == table["label"]
        record[method] = {}
        for score in SCORES:
            risks = selective_risks(correct, ranking(table, method, score))
            kept = {f"{c:g}": 1.0 - float(risks[math.ceil(c * len(risks)) - 1]) for c in COVERAGES}
            record[method][score] = {"aurc": math.fsum(risks.tolist()) / len(risks), "accuracy_at": kept}
    return record


def coverage_columns(table: dict[str, np.ndarray], methods: list[str]) -> dict[str, np.ndarray]:
    """Each sample's place in each deferral order, as the coverage at which it is kept (its rank / n): a sample is
    kept at coverage c when its value is at most c. ``coverage/js`` and ``coverage/<method>``, for the export."""
    count = len(table["index"])
    columns = {}
    for name, (method, score) in {"js": (methods[0], "js"), **{m: (m, "confidence") for m in methods}}.items():
        places = np.empty(count)
        places[ranking(table, method, score)] = np.arange(1, count + 1) / count
        columns[f"coverage/{name}"] = places
    return columns
