"""The decision quadrants and the λ-spread warning, against NumPy counts."""

import pytest
import torch
from helpers import rounding_atol

from tcube_lightning.diagnostics import QUADRANTS, DecisionDiagnostics, lambda_spread_warning


def test_quadrants_count_samples_and_average_their_js_over_batches():
    g = torch.Generator().manual_seed(0)
    pt, ft = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    labels, js = torch.randint(0, 3, (40,), generator=g), torch.rand(40, generator=g)
    low, high = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (40,), generator=g)
    metric = DecisionDiagnostics()
    for rows in (slice(0, 25), slice(25, 40)):  # two batches
        metric.update(pt[rows], ft[rows], labels[rows], js[rows], (low[rows], high[rows]))
    result = metric.compute()
    pt_right, ft_right = (pt.argmax(1) == labels).numpy(), (ft.argmax(1) == labels).numpy()
    masks = {
        "both wrong": ~pt_right & ~ft_right, "only expert right": ~pt_right & ft_right,
        "only pretrained right": pt_right & ~ft_right, "both right": pt_right & ft_right,
    }  # fmt: skip
    assert list(result["quadrants"]) == list(QUADRANTS)
    for name, mask in masks.items():
        cell = result["quadrants"][name]
        assert cell["count"] == int(mask.sum())
        if mask.any():
            assert cell["js_mean"] == pytest.approx(float(js.double().numpy()[mask].mean()), abs=rounding_atol(1.0))
    assert result["flips_between_lambda_extremes"] == int((low != high).sum())
    assert result["js_mean"] == pytest.approx(float(js.double().mean()), abs=rounding_atol(1.0))


def test_the_lambda_spread_warning_names_the_narrow_splits():
    stats = {"a": {"lambda_min": 0.50, "lambda_max": 0.51}, "b": {"lambda_min": 0.2, "lambda_max": 0.9}}
    warning = lambda_spread_warning(stats, 0.05)
    assert "on 1 split(s): a (0.0100)" in warning and "b (" not in warning
    assert "a larger gamma or a wider range [lambda_min, lambda_max] widens the spread" in warning
    assert lambda_spread_warning(stats, 0.005) is None
