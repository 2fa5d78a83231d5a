"""Per-split calibration metrics against NumPy implementations of their definitions, and independent of the
order the samples arrive in (as under DDP)."""

import itertools
import math

import numpy as np
import pytest
import torch

from helpers import rounding_atol
from tcube_lightning.reporting.metrics import ExactCalibrationError, NegativeLogLikelihood


def numpy_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error, L1: Σ_b (n_b / n)·|accuracy_b − confidence_b| over equal-width bins (0, 1]."""
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def samples(seed: int = 0, n: int = 300, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, classes, generator=g), -1)
    return probs, torch.randint(0, classes, (n,), generator=g)


def test_calibration_error_matches_numpy_and_not_the_arrival_order():
    probs, labels = samples()
    metric = ExactCalibrationError(num_classes=5, n_bins=15, norm="l1")
    for rows in (slice(0, 100), slice(100, 300)):
        metric.update(probs[rows], labels[rows])
    value = float(metric.compute())
    assert abs(value - numpy_ece(probs.double().numpy(), labels.numpy())) <= rounding_atol(1.0)
    shuffled = ExactCalibrationError(num_classes=5, n_bins=15, norm="l1")
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    for rows in (order[:170], order[170:]):  # another spread over "processes", another order
        shuffled.update(probs[rows], labels[rows])
    assert float(shuffled.compute()) == value


def test_negative_log_likelihood_matches_numpy_and_not_the_arrival_order():
    probs, labels = samples(seed=2)
    expected = float(np.mean(-np.log(probs.double().numpy()[np.arange(300), labels.numpy()])))
    values = []
    for order in (torch.arange(300), torch.randperm(300, generator=torch.Generator().manual_seed(3))):
        metric = NegativeLogLikelihood()
        for rows in (order[:77], order[77:]):
            metric.update(probs[rows], labels[rows])
        values.append(float(metric.compute()))
    assert abs(values[0] - expected) <= rounding_atol(-math.log(probs.min().item()))
    assert values[0] == values[1]


@pytest.mark.filterwarnings("error::UserWarning")  # nor does the process that read none of "b" warn of it
def test_a_split_reduced_over_processes_in_one_gather_scores_what_one_process_scores(monkeypatch):
    """Two processes' states (batches dealt in turn; the second reads no batch of split "b") reduced in one gather
    give every metric of a plain and a mixed split exactly as one process that read every batch, in rank order,
    computes them (torchmetrics' compute on its own states): counts summed, per-sample values joined in rank order."""
    from tcube_lightning.reporting import metrics as module

    labels = np.arange(12) % 3
    splits = {"a": [(None, 3, labels)], "b": [(None, 3, labels)], "mix": [("a", 3, labels), ("b", 2, labels % 2)]}
    methods = ["t3", "expert"]
    three, three_labels = samples(seed=4, n=36, classes=3)
    two, two_labels = samples(seed=5, n=36, classes=2)

    def feed(metrics: module.RunMetrics, split: str, rows: torch.Tensor) -> None:
        for method, flip in zip(methods, (False, True), strict=True):
            p3, p2 = (p[rows].flip(-1) if flip else p[rows] for p in (three, two))
            if split != "mix":
                metrics.update(split, method, p3, three_labels[rows])
                continue
            metrics.update(split, method, p3, three_labels[rows], torch.zeros(len(rows), dtype=torch.long))
            metrics.update(split, method, p2, two_labels[rows], torch.ones(len(rows), dtype=torch.long))

    batches = [(split, rows) for split in ("a", "mix") for rows in torch.arange(36).split(5)] + [("b", torch.arange(7))]
    ranks, one = [module.RunMetrics(splits, methods) for _ in range(2)], module.RunMetrics(splits, methods)
    for position, batch in enumerate(batches):
        feed(ranks[0] if batch[0] == "b" else ranks[position % 2], *batch)
    for rank in range(2):  # one process: rank 0's batches, then rank 1's
        for position, batch in enumerate(batches):
            if (0 if batch[0] == "b" else position % 2) == rank:
                feed(one, *batch)

    class Sent(Exception):
        """Raised by the gather, with what a process sends to it, before anything is reduced."""

    def sent_by(metrics: module.RunMetrics, split: str) -> list:
        def capture(local):
            raise Sent(local)

        monkeypatch.setattr(module, "gather_objects", capture)
        with pytest.raises(Sent) as sent:
            metrics.compute(split)
        return sent.value.args[0]

    for split in ("a", "b", "mix"):
        monkeypatch.setattr(module, "gather_objects", lambda local: [local])  # one process: no reduction
        expected = one.compute(split)
        parts = [sent_by(metrics, split) for metrics in ranks]
        monkeypatch.setattr(module, "gather_objects", lambda local, parts=parts: parts)
        for metrics in ranks:
            assert metrics.compute(split) == expected, split
        assert expected[1] if split == "mix" else not expected[1]
