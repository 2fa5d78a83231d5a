"""Per-split calibration metrics against NumPy implementations of their definitions, and independent of the
order the samples arrive in (as under DDP)."""

import itertools

import numpy as np
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
    assert abs(values[0] - expected) <= rounding_atol(float(-np.log(probs.min())))
    assert values[0] == values[1]
