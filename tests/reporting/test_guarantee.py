"""Deferral with a guarantee against independent references: the Learn-then-Test threshold recomputed with SciPy's
binomial test from the paper's definition, the conformal quantile with NumPy's, the APS and RAPS sets with MAPIE's
set functions at the same quantile (LAC's with MAPIE's whole split-conformal classifier); and the promises checked
statistically on exchangeable synthetic data, within tolerances from the binomial distribution."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, binomtest

from tcube_lightning.reporting.guarantee import (
    RAPS_K,
    RAPS_PENALTY,
    conformal_quantile,
    ltt_threshold,
    prediction_sets,
    threshold_grid,
    true_class_scores,
)

ALPHA, DELTA = 0.1, 0.1


def synthetic(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (Dirichlet) and labels drawn from them: a model calibrated by construction, exchangeable rows."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, 0.1), size=n)
    labels = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return probs, labels


def test_the_ltt_threshold_is_fixed_sequence_testing_with_binomial_p_values():
    probs, labels = synthetic(400, 5, seed=1)
    confidence, wrong = probs.max(1), probs.argmax(1) != labels
    ours = ltt_threshold(confidence, wrong, ALPHA, DELTA, "confidence")
    expected = math.inf  # Angelopoulos et al. (2021): test from the most selective threshold, stop at the first kept
    for threshold in np.linspace(1.0, 0.0, 201):
        accepted = confidence >= threshold
        n, errors = int(accepted.sum()), int(wrong[accepted].sum())
        if binomtest(0, n, ALPHA, alternative="less").pvalue > DELTA if n else True:  # untestable: passed over
            continue
        if binomtest(errors, n, ALPHA, alternative="less").pvalue > DELTA:
            break
        expected = threshold
    assert ours == pytest.approx(expected, abs=1e-12) and 0 < ours < 1
    assert np.allclose(threshold_grid("confidence"), np.linspace(1.0, 0.0, 201))
    assert ltt_threshold(confidence, np.ones_like(wrong), ALPHA, DELTA, "confidence") == math.inf  # all wrong: none


def test_the_conformal_quantile_is_the_finite_sample_order_statistic():
    scores = np.random.default_rng(2).random(57)
    level = math.ceil((57 + 1) * (1 - ALPHA)) / 57
    assert conformal_quantile(scores, ALPHA) == np.quantile(scores, level, method="inverted_cdf")  # ⌈n·level⌉-th
    assert conformal_quantile(scores[:5], ALPHA) == math.inf  # ⌈6·0.9⌉ = 6 > 5: every class


def test_the_sets_are_mapies_at_the_same_quantile():
    from mapie.conformity_scores.sets.aps import APSConformityScore
    from mapie.conformity_scores.sets.raps import RAPSConformityScore

    probs, labels = synthetic(600, 10, seed=3)
    calibration, test = torch.from_numpy(probs[:400]), torch.from_numpy(probs[400:])
    scores = true_class_scores(calibration, torch.from_numpy(labels[:400]))
    quantiles = {kind: conformal_quantile(values.numpy(), ALPHA) for kind, values in scores.items()}
    ours = prediction_sets(test, quantiles)
    np.testing.assert_array_equal(ours["lac"].numpy(), probs[400:] >= 1 - quantiles["lac"])
    for kind, score in (("aps", APSConformityScore()), ("raps", RAPSConformityScore())):
        score.classes, score.random_state, score.quantiles_ = np.arange(10), 0, np.array([quantiles[kind]])
        score.k_star, score.lambda_star = np.array([RAPS_K]), np.array([RAPS_PENALTY])  # RAPS's, fixed
        theirs = score.get_prediction_sets(probs[400:, :, None], None, np.array([ALPHA]), cv="prefit")[:, :, 0]
        np.testing.assert_array_equal(ours[kind].numpy(), theirs, err_msg=kind)
    assert not torch.equal(ours["aps"], ours["raps"])  # the penalty changes some sets


def test_lac_sets_are_mapies_split_conformal_classifier():
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Given(ClassifierMixin, BaseEstimator):  # a fitted model whose inputs are its probabilities
        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            return self

        def predict_proba(self, x):
            return np.asarray(x)

        def predict(self, x):
            return np.asarray(x).argmax(1)

    probs, labels = synthetic(500, 6, seed=4)
    mapie = SplitConformalClassifier(Given().fit(probs, labels), confidence_level=1 - ALPHA, prefit=True)
    mapie.conformalize(probs[:300], labels[:300])
    theirs = mapie.predict_set(probs[300:])[1][:, :, 0]
    scores = true_class_scores(torch.from_numpy(probs[:300]), torch.from_numpy(labels[:300]))
    ours = prediction_sets(torch.from_numpy(probs[300:]), {"lac": conformal_quantile(scores["lac"].numpy(), ALPHA)})
    np.testing.assert_array_equal(ours["lac"].numpy(), theirs)


DRAWS = 200
"""Seeded draws of calibration and test sets for the statistical checks."""


def binomial_floor(probability: float, draws: int, level: float = 1e-3) -> float:
    """The fraction of ``draws`` below which a property of ``probability`` per draw falls with chance ``level``: the
    tolerance of a statistical check, from the binomial distribution."""
    return binom.ppf(level, draws, probability) / draws


def test_on_exchangeable_data_coverage_and_the_risk_bound_hold():
    """Over seeded draws of a calibration set: each conformal score's coverage of fresh samples averages ≥ 1 − α
    (within three standard errors of the draws' mean), and the LTT rule's selective risk, estimated on a large fresh
    sample (within three of its binomial standard errors), is ≤ α in at least the fraction of draws 1 − δ promises
    (less the binomial floor of that many draws)."""
    coverage = {kind: [] for kind in ("lac", "aps", "raps")}
    held, accepted_fraction = [], []
    for seed in range(DRAWS):
        probs, labels = synthetic(1_000, 5, seed=100 + seed)
        fresh, fresh_labels = synthetic(10_000, 5, seed=10_000 + seed)
        scores = true_class_scores(torch.from_numpy(probs), torch.from_numpy(labels))
        quantiles = {kind: conformal_quantile(values.numpy(), ALPHA) for kind, values in scores.items()}
        for kind, members in prediction_sets(torch.from_numpy(fresh), quantiles).items():
            coverage[kind].append(float(members.numpy()[np.arange(len(fresh)), fresh_labels].mean()))
        threshold = ltt_threshold(probs.max(1), probs.argmax(1) != labels, ALPHA, DELTA, "confidence")
        accepted = fresh.max(1) >= threshold
        accepted_fraction.append(accepted.mean())
        risk = (fresh.argmax(1) != fresh_labels)[accepted].mean() if accepted.any() else 0.0
        held.append(risk <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / max(1, accepted.sum())))
    for kind, values in coverage.items():
        assert np.mean(values) >= 1 - ALPHA - 3 * np.std(values) / math.sqrt(DRAWS), kind
    assert np.mean(held) >= binomial_floor(1 - DELTA, DRAWS)
    assert np.mean(accepted_fraction) > 0.3  # the rule defers some, not all: the check above is not vacuous
