"""The decision quadrants (counts, JS, the JS–DaWin correlation of the paper's Figure 2) against NumPy and SciPy, and
the λ-spread warning."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from helpers import random_sample_table, rounding_atol
from tcube_lightning.reporting.diagnostics import QUADRANTS, decision_diagnostics, lambda_spread_warning, pearson

FLOAT64_RHO_ATOL = rounding_atol(1.0, torch.float64)
"""ρ lies in [−1, 1]: two float64 evaluations (sums of products in another order) differ by a few roundings."""


def test_quadrants_count_samples_average_js_and_correlate_js_with_dawins_ratio():
    table = random_sample_table(200)
    result = decision_diagnostics(table)
    pt_right, ft_right = table["pred/zeroshot"] == table["label"], table["pred/expert"] == table["label"]
    masks = {
        "both wrong": ~pt_right & ~ft_right,
        "only expert right": ~pt_right & ft_right,
        "only pretrained right": pt_right & ~ft_right,
        "both right": pt_right & ft_right,
    }
    assert list(result["quadrants"]) == list(QUADRANTS)
    for name, mask in masks.items():
        cell = result["quadrants"][name]
        assert cell["count"] == int(mask.sum()) > 2  # every quadrant is populated: each ρ is really tested
        js, dawin = table["js"][mask].astype(np.float64), table["w/dawin"][mask].astype(np.float64)
        assert cell["js_mean"] == pytest.approx(float(js.mean()), abs=rounding_atol(1.0, torch.float64))
        assert cell["pearson_js_dawin"] == pytest.approx(pearsonr(js, dawin).statistic, abs=FLOAT64_RHO_ATOL)
    assert result["flips_between_lambda_extremes"] == int(table["flip"].sum())
    del table["flip"]  # without the λ-extremes diagnostic there is no flip count
    assert "flips_between_lambda_extremes" not in decision_diagnostics(table)


def test_pearson_is_none_where_undefined_and_one_for_a_line():
    assert pearson(np.array([0.3]), np.array([0.1])) is None  # one sample
    assert pearson(np.array([0.3, 0.3, 0.3]), np.array([0.1, 0.2, 0.4])) is None  # constant JS
    assert pearson(np.arange(5.0), 2 * np.arange(5.0) + 1) == pytest.approx(1.0, abs=FLOAT64_RHO_ATOL)


def test_the_lambda_spread_warning_names_the_narrow_splits_and_points_to_the_grid():
    stats = {"a": {"lambda_min": 0.50, "lambda_max": 0.51}, "b": {"lambda_min": 0.2, "lambda_max": 0.9}}
    warning = lambda_spread_warning(stats, 0.05, (0.5, 0.58662))
    assert "on 1 split(s): a (0.0100)" in warning and "b (" not in warning
    assert "λ can only move within [0.5000, 0.5866]" in warning
    assert "A larger gamma or a wider range [lambda_min, lambda_max] widens it" in warning
    assert "model.grid evaluates several settings in one pass" in warning
    assert lambda_spread_warning(stats, 0.005, (0.5, 0.58662)) is None
