"""Coefficient maths against independent NumPy/SciPy evaluations of the published formulas."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import expit, softmax

from helpers import rounding_atol
from tcube_lightning.errors import InputError
from tcube_lightning.merging.coefficients import (
    LambdaMapping,
    batch_coefficient,
    cross_entropy_ratio,
    dawin_entropy_ratio,
    entropy,
    expert_weight,
    fit_beta_mixture,
    js_divergence,
    max_confidence_ratio,
    t3_lambda,
)


@pytest.fixture
def logits_pair():
    g = torch.Generator().manual_seed(0)
    return 3 * torch.randn(16, 7, generator=g, dtype=torch.float64), 3 * torch.randn(
        16, 7, generator=g, dtype=torch.float64
    )


def float64_atol(logits) -> float:
    """float64 maths on both sides: rounding relative to the largest logit the coefficients start from."""
    return rounding_atol(max(float(abs(x).max()) for x in logits), torch.float64)


@pytest.mark.parametrize("base", [None, 2.0])
def test_js_matches_scipy(logits_pair, base):
    a, b = logits_pair
    expected = jensenshannon(softmax(a.numpy(), -1), softmax(b.numpy(), -1), axis=-1, base=base) ** 2
    np.testing.assert_allclose(js_divergence(a, b, base=base).numpy(), expected, atol=float64_atol(logits_pair))


def test_js_with_exact_zero_probabilities_matches_scipy():
    # -inf logits give probabilities that are exactly 0.
    a = torch.tensor([[0.0, -math.inf, 1.0], [2.0, 0.0, -math.inf]], dtype=torch.float64)
    b = torch.tensor([[-math.inf, 0.5, 1.0], [2.0, 0.0, -math.inf]], dtype=torch.float64)
    js = js_divergence(a, b)
    expected = jensenshannon(softmax(a.numpy(), -1), softmax(b.numpy(), -1), axis=-1) ** 2
    assert torch.isfinite(js).all()
    finite = (a[a.isfinite()].abs().max(), b[b.isfinite()].abs().max())
    np.testing.assert_allclose(js.numpy(), expected, atol=float64_atol(finite))
    assert js[1].item() == 0.0


def test_js_is_finite_and_bounded_for_huge_logits():
    a = torch.tensor([[1e4, -1e4, 0.0], [100.0, 0.0, 0.0]])
    b = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 100.0, 0.0]])
    js = js_divergence(a, b)
    assert torch.isfinite(js).all()
    # Disjoint one-hot distributions: JS reaches its maximum ln 2.
    assert js[0].item() == pytest.approx(math.log(2), abs=rounding_atol(1.0))
    assert js_divergence(a, b, base=2)[0].item() == pytest.approx(1.0, abs=rounding_atol(1.0))


def test_js_runs_in_float32_for_half_inputs(logits_pair):
    a, b = (x.to(torch.bfloat16) for x in logits_pair)
    assert js_divergence(a, b).dtype == torch.float32


def test_lambda_mapping_matches_formula():
    js = np.array([0.0, 0.1, 0.4, math.log(2)])
    expected = 0.2 + (0.9 - 0.2) / (1 + np.exp(-1.5 * js))
    ours = t3_lambda(torch.tensor(js), 0.2, 0.9, 1.5).numpy()
    np.testing.assert_allclose(ours, expected, atol=rounding_atol(1.0, torch.float64))


def test_expert_weight_conventions():
    lam = torch.tensor([0.1, 0.7], dtype=torch.float64)
    assert expert_weight(lam, "expert").tolist() == [0.1, 0.7]
    assert expert_weight(lam, "pretrained").tolist() == [1 - 0.1, 1 - 0.7]


def test_lambda_mapping_goes_from_logits_to_expert_weights(logits_pair):
    a, b = logits_pair
    mapping = LambdaMapping(lambda_min=0.1, lambda_max=0.8, gamma=3.0, lambda_weights="pretrained", js_base=2.0)
    js = jensenshannon(softmax(a.numpy(), -1), softmax(b.numpy(), -1), axis=-1, base=2) ** 2
    lam = 0.1 + 0.7 * expit(3.0 * js)
    atol = float64_atol(logits_pair)
    np.testing.assert_allclose(mapping.js(a, b).numpy(), js, rtol=0, atol=atol)
    np.testing.assert_allclose(mapping.expert_weights(mapping.lambdas(mapping.js(a, b))).numpy(), 1 - lam, atol=atol)
    assert mapping.extreme_weights() == (1 - 0.1, 1 - 0.8)
    assert LambdaMapping(0.1, 0.8, lambda_weights="expert").extreme_weights() == (0.1, 0.8)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"lambda_min": 0.9, "lambda_max": 0.5}, r"model.lambda_min \(0.9\) must not exceed model.lambda_max \(0.5\)"),
        ({"gamma": -1.0}, "model.gamma must be >= 0"),
        ({"lambda_weights": "generalist"}, "model.lambda_weights must be 'pretrained' or 'expert'"),
        ({"js_base": 1.0}, "model.js_base must be > 0 and not 1"),
    ],
)
def test_lambda_mapping_settings_are_checked_when_made(settings, message):
    with pytest.raises(InputError, match=message):
        LambdaMapping(**settings)


def test_batch_coefficient_is_the_mean():
    w = torch.tensor([0.1, 0.2, 0.6])
    assert batch_coefficient(w).item() == pytest.approx(np.mean([0.1, 0.2, 0.6]))


def test_entropy_and_dawin_ratio_match_numpy(logits_pair):
    a, b = logits_pair
    t_pt, t_ft = 0.96, 1.0066
    p, q = softmax(a.numpy() / t_pt, -1), softmax(b.numpy() / t_ft, -1)
    h_pt, h_ft = -(p * np.log(p)).sum(-1), -(q * np.log(q)).sum(-1)
    np.testing.assert_allclose(entropy(a, t_pt).numpy(), h_pt, atol=float64_atol(logits_pair))
    expected = np.exp(-h_ft) / (np.exp(-h_pt) + np.exp(-h_ft))
    np.testing.assert_allclose(dawin_entropy_ratio(a, b, t_pt, t_ft).numpy(), expected, atol=float64_atol(logits_pair))


def test_max_confidence_and_cross_entropy_ratios_match_numpy(logits_pair):
    a, b = logits_pair
    p, q = softmax(a.numpy(), -1), softmax(b.numpy(), -1)
    expected = q.max(-1) / (p.max(-1) + q.max(-1))
    np.testing.assert_allclose(max_confidence_ratio(a, b).numpy(), expected, atol=float64_atol(logits_pair))
    pseudo = (p + q).argmax(-1)
    ce_pt, ce_ft = -np.log(p[np.arange(len(p)), pseudo]), -np.log(q[np.arange(len(q)), pseudo])
    expected = np.exp(-ce_ft) / (np.exp(-ce_pt) + np.exp(-ce_ft))
    np.testing.assert_allclose(cross_entropy_ratio(a, b).numpy(), expected, atol=float64_atol(logits_pair))


def test_beta_mixture_recovers_known_components():
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.beta(2, 8, 3000), rng.beta(20, 20, 2000), rng.beta(9, 1.5, 3000)])
    mixture = fit_beta_mixture(torch.tensor(rng.permutation(samples)), components=3)
    order = torch.argsort(mixture.means)
    # Statistical, not rounding, tolerances: 800 samples estimate the components' means and weights.
    np.testing.assert_allclose(mixture.means[order].numpy(), [0.2, 0.5, 9 / 10.5], atol=0.015)
    np.testing.assert_allclose(mixture.weights[order].numpy(), [0.375, 0.25, 0.375], atol=0.03)
    assert mixture.note == ""
    # Samples far from a boundary go to the component that generated them.
    assert mixture.assign(torch.tensor([0.15, 0.5, 0.9])).tolist() == order.tolist()


def test_beta_mixture_without_spread_falls_back_to_the_distinct_values():
    mixture = fit_beta_mixture(torch.tensor([0.0, 0.0, 1.0, 0.0]), components=3)
    assert mixture.means.tolist() == [0.0, 1.0]
    assert mixture.weights.tolist() == [0.75, 0.25]
    assert "2 distinct coefficient value(s)" in mixture.note
    assert mixture.assign(torch.tensor([0.0, 1.0])).tolist() == [0, 1]


def test_dawin_offset_adjustment_matches_its_formula(logits_pair):
    a, b = logits_pair
    p, q = softmax(a.numpy() / 0.9, -1), softmax(b.numpy() / 1.1, -1)
    h_pt, h_ft = -(p * np.log(p)).sum(-1), -(q * np.log(q)).sum(-1)
    offset = (h_pt.std(ddof=1) / h_pt.mean() + h_ft.std(ddof=1) / h_ft.mean()) / 2
    scale = (h_pt.mean() + h_ft.mean()) / h_pt.mean()
    expected = (np.exp(-h_ft) + offset / scale) / (np.exp(-h_pt) + np.exp(-h_ft) + offset)
    ours = dawin_entropy_ratio(a, b, 0.9, 1.1, offset=True).numpy()
    np.testing.assert_allclose(ours, expected, atol=float64_atol(logits_pair))
