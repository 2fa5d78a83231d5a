"""Deferral with a guarantee, calibrated on a labelled split that is not evaluated (``data.calibration``).

**Selective classification with a risk guarantee** (Learn then Test, Angelopoulos, Bates, Candès, Jordan and Lei,
2021). A sample is accepted when its score (a method's top probability, or −JS where the method merges) is at least
a threshold t; the selective risk is the error among accepted samples. Over a fixed grid of thresholds from the
most to the least selective, the null hypothesis "risk(t) > α" is tested on the calibration split with the exact
binomial p-value P(Bin(n_t, α) ≤ errors_t) (n_t the accepted samples, given which the errors are binomial under
exchangeability), and rejected while p ≤ δ: fixed-sequence testing, which needs no multiplicity correction
(thresholds accepting too few calibration samples to be rejected at all are passed over: which ones depends on the
scores, not the labels). The least selective threshold rejected is chosen;
then P(risk ≤ α) ≥ 1 − δ on data exchangeable with the calibration split. None rejected: nothing is accepted.

**Split-conformal prediction sets** (Vovk et al.; Romano, Sesia and Candès, 2020 for APS; Angelopoulos, Bates, Malik
and Jordan, 2021 for RAPS). A nonconformity score s(x, y) of each calibration sample's true class; q̂ the
⌈(n + 1)(1 − α)⌉-th smallest of the n scores (infinite where that exceeds n); the set of a new sample holds every class
y with s(x, y) ≤ q̂, and covers its true class with probability ≥ 1 − α under exchangeability. Scores, the
non-randomised forms (a sample's sets depend on it alone, so they are the same on any number of processes), in
float64:
- LAC: 1 − p_y, and the set {y: 1 − p_y ≤ q̂};
- APS: the total probability of the classes at least as likely as y (y's own included); the set: the most likely
  classes until that total reaches q̂, the class that reaches it included;
- RAPS: APS + λ·max(0, rank(y) − k_reg), rank 1 the most likely class (λ = ``RAPS_PENALTY``, k_reg = ``RAPS_K``), its
  set as APS's.

Everything here is plain NumPy, SciPy and torch on numbers already gathered from every process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import binom

from tcube_lightning.errors import InputError

CONFORMAL_SCORES = ("lac", "aps", "raps")
SELECTIVE_SCORES = ("confidence", "js")
RAPS_PENALTY = 0.1
RAPS_K = 1
GRID_SIZE = 200
"""Thresholds of the fixed grid per score, tested from the most to the least selective."""
NOT_MERGING = ("zeroshot", "expert", "ensemble", "select")
"""Method families that merge no weights: their deferral score is their top probability alone (−JS is for the
methods that merge the models whose disagreement it measures)."""
Methods = dict[str, bool]
"""Method name → whether it merges weights (and so is also deferred by −JS)."""


def threshold_grid(score: str) -> np.ndarray:
    """The fixed grid of acceptance thresholds of a score, most selective first: top probabilities from 1 down,
    −JS from 0 (the models agree exactly) down to −ln 2 (its largest value, in nats)."""
    steps = np.arange(GRID_SIZE + 1) / GRID_SIZE
    return 1.0 - steps if score == "confidence" else -math.log(2.0) * steps


def ltt_threshold(scores: np.ndarray, wrong: np.ndarray, alpha: float, delta: float, score: str) -> float:
    """The least selective threshold of ``threshold_grid(score)`` for which fixed-sequence testing rejects
    "selective risk > α" at level δ on the calibration samples (``scores``, and ``wrong``: the prediction is wrong);
    thresholds that accept too few calibration samples for any outcome to reject (fewer than log δ / log(1 − α): a
    function of the scores alone, not of the labels) are passed over, never chosen; +inf (accept nothing) if the first
    tested is not rejected. Every threshold's counts come from one sort and its p-values from one vectorised call
    (a threshold at a time, SciPy's per-call cost made calibration 20 ms per method and score on a small split)."""
    thresholds, order = threshold_grid(score), np.argsort(scores, kind="stable")
    first = np.searchsorted(scores[order].astype(np.float64), thresholds)  # samples from here on score ≥ threshold
    errors_from = np.concatenate([np.cumsum(wrong[order][::-1])[::-1], [0]])  # the wrong ones from each position on
    count, errors = len(scores) - first, errors_from[first]
    testable = binom.cdf(0, count, alpha) <= delta  # untestable: even no error would not reject
    rejected = binom.cdf(errors, count, alpha) <= delta
    stops = np.flatnonzero(testable & ~rejected)  # the sequence stops at the first testable threshold not rejected
    end = stops[0] if len(stops) else len(thresholds)
    chosen = np.flatnonzero(testable[:end] & rejected[:end])
    return float(thresholds[chosen[-1]]) if len(chosen) else math.inf


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """q̂: the ⌈(n + 1)(1 − α)⌉-th smallest calibration score; +inf where that rank exceeds n."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    return math.inf if rank > n else float(np.sort(scores)[rank - 1])


def ranked_scores(probs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """APS's and RAPS's scores of the classes in order of decreasing probability (the mass of the classes up to and
    including each, RAPS's with its penalty), and each class's rank (0: the most likely), in float64."""
    ordered, order = probs.double().sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    rank = torch.empty_like(order).scatter_(-1, order, positions.expand_as(order))
    cumulative = ordered.cumsum(-1)
    penalty = RAPS_PENALTY * (positions + 1 - RAPS_K).clamp_min(0)
    return {"aps": cumulative, "raps": cumulative + penalty}, rank


def true_class_scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each calibration sample's nonconformity score of its true class, per kind."""
    ranked, rank = ranked_scores(probs)
    position = rank.gather(-1, labels.long()[:, None])
    scores = {kind: values.gather(-1, position).squeeze(-1) for kind, values in ranked.items()}
    return {"lac": 1 - probs.double().gather(-1, labels.long()[:, None]).squeeze(-1), **scores}


def prediction_sets(probs: torch.Tensor, thresholds: dict[str, float]) -> dict[str, torch.Tensor]:
    """Each sample's set per kind of ``thresholds`` (rows × classes, True for a class in it): LAC's, the classes scoring
    at most q̂;
    APS's and RAPS's, the most likely classes until their score reaches q̂, the class that reaches it included (the
    non-randomised sets of Romano et al. and Angelopoulos et al., as MAPIE's ``include_last_label=True``)."""
    ranked, rank = ranked_scores(probs)
    sets = {"lac": 1 - probs.double() <= thresholds["lac"]} if "lac" in thresholds else {}
    for kind, values in ((k, v) for k, v in ranked.items() if k in thresholds):
        before = torch.cat(
            [torch.zeros_like(values[:, :1]), values[:, :-1]], dim=-1
        )  # the score up to the class before
        sets[kind] = (before < thresholds[kind]).gather(-1, rank)
    return sets


@dataclass(frozen=True)
class GuaranteeSettings:
    """The promise deferral makes (``data.calibration`` gives the data it is calibrated on).

    Args:
        alpha: The selective risk to stay under (and the conformal sets' miscoverage): 1 − alpha their coverage.
        delta: The probability, over calibration sets, with which the selective-risk promise may fail.
    """

    alpha: float = 0.05
    delta: float = 0.1

    def __post_init__(self) -> None:
        bad = [f"{name} {value} not in (0, 1)" for name, value in vars(self).items() if not 0 < value < 1]
        if bad:
            raise InputError("model.guarantee: " + "; ".join(bad))


@dataclass(frozen=True)
class CalibratedRules:
    """What the calibration split fixed for each method: LTT thresholds per selective score and q̂ per conformal
    score."""

    alpha: float
    delta: float
    samples: int
    thresholds: dict[str, dict[str, float]]
    """Method → selective score → threshold (+inf: accept nothing)."""
    quantiles: dict[str, dict[str, float]]
    """Method → conformal score → q̂."""

    def record(self) -> dict:
        """For results.json: infinities as null (JSON has none)."""

        def plain(value: float) -> float | None:
            return None if math.isinf(value) else value

        return {
            "alpha": self.alpha,
            "delta": self.delta,
            "samples": self.samples,
            "thresholds": {m: {s: plain(t) for s, t in by.items()} for m, by in self.thresholds.items()},
            "quantiles": {m: {s: plain(q) for s, q in by.items()} for m, by in self.quantiles.items()},
        }


def selective_scores(table: dict[str, np.ndarray], method: str, merges: bool) -> dict[str, np.ndarray]:
    """A method's per-sample deferral scores: its top probability, and −JS where it ``merges``."""
    scores = {"confidence": table[f"prob/{method}"].astype(np.float64)}
    if merges:
        scores["js"] = -table["js"].astype(np.float64)
    return scores


def calibrate(table: dict[str, np.ndarray], methods: Methods, alpha: float, delta: float) -> CalibratedRules:
    """The rules of every method from the calibration split's gathered table (its labels, predictions, top
    probabilities, JS and each conformal score of the true class, ``score/<kind>/<method>``)."""
    thresholds, quantiles = {}, {}
    for method, merges in methods.items():
        wrong = table[f"pred/{method}"] != table["label"]
        scores = selective_scores(table, method, merges)
        thresholds[method] = {s: ltt_threshold(v, wrong, alpha, delta, s) for s, v in scores.items()}
        quantiles[method] = {k: conformal_quantile(table[f"score/{k}/{method}"], alpha) for k in CONFORMAL_SCORES}
    return CalibratedRules(alpha, delta, len(table["label"]), thresholds, quantiles)


def guarantee_record(table: dict[str, np.ndarray], rules: CalibratedRules, methods: Methods) -> dict:
    """On an evaluated split, per method: for each selective score the coverage the calibrated threshold reached,
    the selective risk realised (null where nothing was accepted) and whether it is at most α; for each conformal
    score the empirical coverage and the mean set size."""
    record = {}
    for method, merges in methods.items():
        wrong = table[f"pred/{method}"] != table["label"]
        selective = {}
        for score, values in selective_scores(table, method, merges).items():
            accepted = values >= rules.thresholds[method][score]
            count = int(accepted.sum())
            risk = float(wrong[accepted].mean()) if count else None
            selective[score] = {
                "coverage": count / len(values),
                "risk": risk,
                "held": risk is None or risk <= rules.alpha,
            }
        sets = {
            kind: {
                "coverage": float(table[f"covered/{kind}/{method}"].mean()),
                "set_size": float(table[f"set_size/{kind}/{method}"].mean()),
            }
            for kind in CONFORMAL_SCORES
        }
        record[method] = {"selective": selective, "sets": sets}
    return record


def calibration_columns(probabilities: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A calibration batch's per-sample columns: each method's conformal scores of the true class,
    ``score/<kind>/<method>``."""
    return {
        f"score/{kind}/{method}": score
        for method, probs in probabilities.items()
        for kind, score in true_class_scores(probs, labels).items()
    }


def set_columns(
    probabilities: dict[str, torch.Tensor], rules: CalibratedRules, labels: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """An evaluated batch's per-sample conformal columns per method and kind: the set's size and, with ``labels``,
    whether it holds the true class (``set_size/<kind>/<method>``, ``covered/<kind>/<method>``); without labels
    (``predict``) the APS set itself (``set/<method>``: rows × classes) and whether the method's top probability
    clears its calibrated threshold (``accepted/<method>``)."""
    columns = {}
    for method, probs in probabilities.items():
        sets = prediction_sets(probs, rules.quantiles[method])
        for kind, members in sets.items():
            columns[f"set_size/{kind}/{method}"] = members.sum(-1)
            if labels is not None:
                columns[f"covered/{kind}/{method}"] = members.gather(-1, labels.long()[:, None]).squeeze(-1)
        if labels is None:
            columns[f"set/{method}"] = sets["aps"]
            columns[f"accepted/{method}"] = probs.max(-1).values >= rules.thresholds[method]["confidence"]
    return columns


def accepted_columns(table: dict[str, np.ndarray], rules: CalibratedRules, methods: Methods) -> dict[str, np.ndarray]:
    """Each sample's decision under each method's calibrated rule, per selective score: ``accepted/<score>/<method>``
    (False: deferred to a person)."""
    return {
        f"accepted/{score}/{method}": values >= rules.thresholds[method][score]
        for method, merges in methods.items()
        for score, values in selective_scores(table, method, merges).items()
    }
