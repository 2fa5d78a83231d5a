"""Per-sample merging coefficients: pure tensor functions, no model code.

All inputs are logits of shape (batch, classes). Everything is computed from log-softmax so that
exact zeros in the probabilities stay finite and CLIP's large logits (scale 100) stay stable.
The maths always runs in float32 (or wider), whatever precision the models ran in.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from tcube_lightning.errors import InputError

LambdaWeights = Literal["pretrained", "expert"]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log(½·p + ½·q) from log-probabilities: the output ensemble, and JS's midpoint distribution."""
    return torch.logaddexp(log_p, log_q) - math.log(2.0)


def top_probabilities(logits_pt: torch.Tensor, logits_ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's largest class probability per row (its confidence)."""
    return _log_probs(logits_pt).max(-1).values.exp(), _log_probs(logits_ft).max(-1).values.exp()


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, base: float | None = None) -> torch.Tensor:
    """Jensen-Shannon divergence between softmax(logits_a) and softmax(logits_b), one value per row.

    Natural log by default (range [0, ln 2]); ``base=2`` gives bits (range [0, 1]).
    """
    log_p, log_q = _log_probs(logits_a), _log_probs(logits_b)
    log_m = log_mixture(log_p, log_q)
    # xlogy-style: a term with p == 0 contributes 0, never 0 * -inf.
    kl_pm = torch.where(log_p.isneginf(), 0.0, log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = torch.where(log_q.isneginf(), 0.0, log_q.exp() * (log_q - log_m)).sum(-1)
    js = (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)
    return js / math.log(base) if base is not None else js


def t3_lambda(js: torch.Tensor, lambda_min: float = 0.0, lambda_max: float = 1.0, gamma: float = 0.5) -> torch.Tensor:
    """T³'s mapping λ(x) = λ_min + (λ_max − λ_min)·σ(γ·JS(x))."""
    return lambda_min + (lambda_max - lambda_min) * torch.sigmoid(gamma * js)


def expert_weight(lam: torch.Tensor, lambda_weights: LambdaWeights) -> torch.Tensor:
    """Convert λ into w, the weight on the expert in θ = (1−w)·θ_pt + w·θ_ft.

    ``pretrained``: λ is the weight on the generalist (more disagreement → more generalist), w = 1 − λ.
    ``expert``: λ is the weight on the expert (the convention of DaWin and WiSE-FT), w = λ.
    """
    return 1.0 - lam if lambda_weights == "pretrained" else lam


@dataclass(frozen=True)
class LambdaMapping:
    """T³'s settings: how a sample's JS divergence becomes its weight on the expert. Checked once, here, when
    the run is configured, before any model loads."""

    lambda_min: float = 0.0
    lambda_max: float = 1.0
    gamma: float = 0.5
    lambda_weights: LambdaWeights = "expert"
    """Which model λ weights. ``expert`` (default): the reading of T³'s Figure 4 caption and of the DaWin code its
    code reuses; ``pretrained``: the abstract's reading."""
    js_base: float | None = None

    def __post_init__(self) -> None:
        if self.lambda_min > self.lambda_max:
            raise InputError(
                f"model.lambda_min ({self.lambda_min}) must not exceed model.lambda_max ({self.lambda_max})"
            )
        if self.gamma < 0:
            raise InputError(f"model.gamma must be >= 0, got {self.gamma}")
        if self.lambda_weights not in ("pretrained", "expert"):
            raise InputError(f"model.lambda_weights must be 'pretrained' or 'expert', got {self.lambda_weights!r}")
        if self.js_base is not None and (self.js_base <= 0 or self.js_base == 1):
            raise InputError(f"model.js_base must be > 0 and not 1 (or null for natural log), got {self.js_base}")

    def js(self, logits_pt: torch.Tensor, logits_ft: torch.Tensor) -> torch.Tensor:
        return js_divergence(logits_pt, logits_ft, base=self.js_base)

    def lambdas(self, js: torch.Tensor) -> torch.Tensor:
        return t3_lambda(js, self.lambda_min, self.lambda_max, self.gamma)

    def expert_weights(self, lam: torch.Tensor) -> torch.Tensor:
        return expert_weight(lam, self.lambda_weights)

    def lambda_range(self) -> tuple[float, float]:
        """The λ these settings can give: JS lies in [0, ln 2] (in its base), so λ in
        [λ_min + Δ·σ(0), λ_min + Δ·σ(γ·JS_max)] with Δ = λ_max − λ_min."""
        js_max = math.log(2.0) / (math.log(self.js_base) if self.js_base is not None else 1.0)
        low, high = self.lambdas(torch.tensor([0.0, js_max], dtype=torch.float64)).tolist()
        return low, high

    def weight_range(self) -> tuple[float, float]:
        """The expert weights T³ can merge at, lowest first."""
        weights = self.expert_weights(torch.tensor(self.lambda_range(), dtype=torch.float64))
        return float(weights.min()), float(weights.max())

    def extreme_weights(self) -> tuple[float, float]:
        """The expert weights at λ_min and at λ_max: how far T³ can move at all."""
        extremes = self.expert_weights(torch.tensor([self.lambda_min, self.lambda_max], dtype=torch.float64))
        return float(extremes[0]), float(extremes[1])


@dataclass(frozen=True)
class T3Setting:
    """One entry of ``model.grid``: T³ settings evaluated beside the run's own, on the same batches and the same
    pretrained and expert forwards. Fields left unset keep the run's value; the set ones name the columns
    (``t3[gamma=4]``)."""

    gamma: float | None = None
    lambda_min: float | None = None
    lambda_max: float | None = None
    lambda_weights: LambdaWeights | None = None

    def overrides(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def label(self) -> str:
        """The set fields as ``name=value``, comma-separated, in field order: ``gamma=4,lambda_max=0.8``."""
        return ",".join(f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}" for k, v in self.overrides().items())


def grid_setting(index: int, entry: T3Setting | dict) -> T3Setting:
    """A ``model.grid`` entry as the command line or a config gives it (a mapping), checked field by field."""
    if isinstance(entry, T3Setting):
        return entry
    names = [f.name for f in fields(T3Setting)]
    if not isinstance(entry, dict):
        raise InputError(f"model.grid[{index}] must be a mapping of some of {names}, got {entry!r}")
    unknown = sorted(set(entry) - set(names))
    if unknown:
        close = [match for name in unknown for match in difflib.get_close_matches(name, names, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"model.grid[{index}]: unknown field(s) {unknown}{hint}; the fields are {names}")
    try:
        return T3Setting(**{k: v if k == "lambda_weights" or v is None else float(v) for k, v in entry.items()})
    except (TypeError, ValueError) as err:
        raise InputError(f"model.grid[{index}]: {err}") from err


def grid_mappings(run: LambdaMapping, grid: list[T3Setting | dict]) -> dict[str, LambdaMapping]:
    """Each ``model.grid`` setting applied to the run's own mapping, by label; checked like the run's own settings,
    the error naming the entry."""
    mappings: dict[str, LambdaMapping] = {}
    for index, entry in enumerate(grid):
        setting = grid_setting(index, entry)
        if not setting.overrides():
            raise InputError(f"model.grid[{index}] sets none of {[f.name for f in fields(T3Setting)]}")
        if setting.label in mappings:
            raise InputError(f"model.grid[{index}] repeats the setting {setting.label!r}")
        try:
            mappings[setting.label] = replace(run, **setting.overrides())
        except InputError as err:
            raise InputError(f"model.grid[{index}] ({setting.label}): {err}") from err
        if mappings[setting.label] == run:
            raise InputError(f"model.grid[{index}] ({setting.label}) is the run's own setting: its columns repeat")
    return mappings


def batch_coefficient(weights: torch.Tensor) -> torch.Tensor:
    """T³_B: one coefficient per batch (and expert), the mean of the per-sample coefficients: a vector of rows, or
    rows × experts (then each expert's column's mean, as one expert's vector would be averaged)."""
    if weights.ndim == 1:
        return weights.mean()
    return torch.stack([weights[:, k].mean() for k in range(weights.shape[1])])


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature), one value per row."""
    log_p = _log_probs(logits / temperature)
    return -torch.where(log_p.isneginf(), 0.0, log_p.exp() * log_p).sum(-1)


def dawin_entropy_ratio(
    logits_pt: torch.Tensor,
    logits_ft: torch.Tensor,
    temperature_pt: float = 1.0,
    temperature_ft: float = 1.0,
    offset: bool = False,
) -> torch.Tensor:
    """DaWin's weight on the expert: exp(−H_ft) / (exp(−H_pt) + exp(−H_ft)), i.e. σ(H_pt − H_ft).

    ``offset`` applies DaWin's adjustment, whose statistics are taken over all the rows given (so pass
    the whole evaluation set): b = (std(H_pt)/mean(H_pt) + std(H_ft)/mean(H_ft)) / 2,
    c = (mean(H_pt) + mean(H_ft)) / mean(H_pt), w = (exp(−H_ft) + b/c) / (exp(−H_pt) + exp(−H_ft) + b).
    Standard deviations are the unbiased (n − 1) ones.
    """
    h_pt, h_ft = entropy(logits_pt, temperature_pt), entropy(logits_ft, temperature_ft)
    if not offset:
        return torch.sigmoid(h_pt - h_ft)
    b = (h_pt.std() / h_pt.mean() + h_ft.std() / h_ft.mean()) / 2
    c = (h_pt.mean() + h_ft.mean()) / h_pt.mean()
    return (torch.exp(-h_ft) + b / c) / (torch.exp(-h_pt) + torch.exp(-h_ft) + b)


def max_confidence_ratio(logits_pt: torch.Tensor, logits_ft: torch.Tensor) -> torch.Tensor:
    """Weight on the expert from the two models' top probabilities: c_ft / (c_pt + c_ft)."""
    c_pt, c_ft = top_probabilities(logits_pt, logits_ft)
    return c_ft / (c_pt + c_ft)


def cross_entropy_ratio(logits_pt: torch.Tensor, logits_ft: torch.Tensor) -> torch.Tensor:
    """DaWin's X-entropy variant: exp(−CE_ft) / (exp(−CE_pt) + exp(−CE_ft)), i.e. σ(CE_pt − CE_ft).

    CE_m is model m's cross-entropy against the pseudo label argmax(p_pt + p_ft) of the output ensemble.
    """
    log_pt, log_ft = _log_probs(logits_pt), _log_probs(logits_ft)
    pseudo = log_mixture(log_pt, log_ft).argmax(-1, keepdim=True)
    return torch.sigmoid(log_ft.gather(-1, pseudo).squeeze(-1) - log_pt.gather(-1, pseudo).squeeze(-1))


@dataclass(frozen=True)
class BetaMixture:
    """A fitted mixture of Beta distributions over coefficients in (0, 1)."""

    weights: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    note: str = ""
    """Why the fit was replaced by a fallback, if it was."""
    point_masses: bool = False
    """The fallback: each component is one exact value; samples go to the nearest."""

    @property
    def means(self) -> torch.Tensor:
        return self.a / (self.a + self.b)

    def log_likelihoods(self, x: torch.Tensor) -> torch.Tensor:
        """log π_k + log Beta(x | a_k, b_k), shape (len(x), K)."""
        x = x.detach().double().cpu().clamp(_BETA_EPS, 1 - _BETA_EPS)[:, None]
        log_beta = torch.lgamma(self.a) + torch.lgamma(self.b) - torch.lgamma(self.a + self.b)
        return self.weights.log() + (self.a - 1) * x.log() + (self.b - 1) * (1 - x).log() - log_beta

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Each coefficient's most likely component."""
        if self.point_masses:
            return (x.detach().double().cpu()[:, None] - self.means).abs().argmin(-1)
        return self.log_likelihoods(x).argmax(-1)

    def summary(self) -> dict:
        """The fitted mixture as plain numbers (results.json)."""
        summary = {"means": self.means.tolist(), "weights": self.weights.tolist(), "a": self.a.tolist()}
        return summary | {"b": self.b.tolist()} | ({"note": self.note} if self.note else {})


_BETA_EPS = 1e-6


def _moment_match(x: torch.Tensor, resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step: mixture weights, and Beta parameters whose mean and variance match the weighted moments."""
    total = resp.sum(0).clamp_min(1e-12)
    mean = (resp * x[:, None]).sum(0) / total
    var = (resp * (x[:, None] - mean) ** 2).sum(0) / total
    var = torch.minimum(var.clamp_min(1e-10), mean * (1 - mean) * 0.999)
    common = mean * (1 - mean) / var - 1
    return total / len(x), mean * common, (1 - mean) * common


def fit_beta_mixture(
    values: torch.Tensor, components: int = 3, iterations: int = 200, tol: float = 1e-8
) -> BetaMixture:
    """Fit a K-component Beta mixture by EM: k-means initialisation, moment-matching M-step (DaWin's recipe).

    With no more distinct values than components, each distinct value becomes its own component
    (exact, and said in ``note``): EM cannot fit a spread that is not there. The values are sorted first, so
    the fit does not depend on their order (e.g. on how samples were spread over processes).
    """
    raw = values.detach().double().flatten().cpu().sort().values
    distinct = torch.unique(raw)
    if len(distinct) <= components:
        counts = torch.stack([(raw == v).sum() for v in distinct]).double()
        note = f"{len(distinct)} distinct coefficient value(s) for {components} components: one merge per value"
        spread = torch.full_like(distinct, 1e6)
        return BetaMixture(counts / counts.sum(), distinct * spread, (1 - distinct) * spread, note, point_masses=True)
    x = raw.clamp(_BETA_EPS, 1 - _BETA_EPS)
    centers = torch.quantile(x, torch.linspace(0.1, 0.9, components, dtype=torch.float64))
    for _ in range(50):  # 1-D k-means
        assignment = (x[:, None] - centers).abs().argmin(-1)
        new = torch.stack(
            [x[assignment == k].mean() if (assignment == k).any() else centers[k] for k in range(components)]
        )
        if torch.allclose(new, centers):
            break
        centers = new
    resp = torch.nn.functional.one_hot(assignment, components).double()
    previous = -math.inf
    for _ in range(iterations):
        weights, a, b = _moment_match(x, resp)
        mixture = BetaMixture(weights.clamp_min(1e-12), a, b)
        log_lik = mixture.log_likelihoods(x)
        total = torch.logsumexp(log_lik, -1)
        resp = (log_lik - total[:, None]).exp()
        if total.mean().item() - previous < tol:
            break
        previous = total.mean().item()
    weights, a, b = _moment_match(x, resp)
    return BetaMixture(weights.clamp_min(1e-12), a, b)


# ------------------------------------------------------------------------------------------------- several experts
KRule = Literal["independent", "routed"]


@dataclass(frozen=True)
class KExperts:
    """T³ with K experts: our extension of T³ (the paper merges one generalist with one expert). Each expert k gets
    T³'s coefficient from its own disagreement with the generalist, λ_k(x) = λ_min + (λ_max − λ_min)·σ(γ·JS(p_pt ‖
    p_k)), turned into a weight w_k by ``lambda_weights``; the rule combines them for θ(x) = θ_pt + Σ_k w_k(x)·τ_k.

    Args:
        rule: ``independent``: w_k·s, every expert on its own (s: ``scale``, default 1/K, the experts sharing one
            budget); ``routed``: w_k·r_k(x), r = softmax over the experts of −H(p_k(x)), DaWin-MTL's routing by
            confidence (the most certain expert takes most). With one expert both are T³ itself.
        scale: s of ``independent``; None for 1/K.
    """

    rule: KRule = "independent"
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("independent", "routed"):
            raise InputError(f"model.k_experts.rule must be 'independent' or 'routed', got {self.rule!r}")
        if self.scale is not None and not self.scale > 0:
            raise InputError(f"model.k_experts.scale must be > 0 (or null for 1/K), got {self.scale}")

    def box(self, low: float, high: float, count: int) -> tuple[float, float]:
        """The range each expert's weight w_k can take when each λ_k's weight lies in [low, high]: the independent
        rule's s·[low, high], the routed rule's between 0 and high (its routing is in (0, 1))."""
        if count == 1:
            return low, high
        if self.rule == "independent":
            scale = self.scale if self.scale is not None else 1.0 / count
            return scale * low, scale * high
        return min(0.0, low), max(0.0, high)

    def combine(self, weights: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        """The weights (rows × experts) each expert's task vector is merged with; one expert's as they are."""
        count = weights.shape[-1]
        if count == 1:
            return weights
        if self.rule == "independent":
            return weights * (self.scale if self.scale is not None else 1.0 / count)
        return weights * routing(expert_logits)


def routing(expert_logits: torch.Tensor) -> torch.Tensor:
    """softmax over the experts of −H(p_k), per row (rows × experts) from logits (experts × rows × classes)."""
    return torch.softmax(-torch.stack([entropy(logits) for logits in expert_logits], dim=-1), dim=-1)


def generalised_js(logits: list[torch.Tensor]) -> torch.Tensor:
    """The generalised Jensen–Shannon divergence of n distributions with equal weights, per row: H(mean p) − mean
    H(p) (nats; at most log n). With two it is ``js_divergence``."""
    log_p = torch.stack([_log_probs(x) for x in logits])
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(len(logits))
    mean_entropy = torch.stack([-torch.where(lp.isneginf(), 0.0, lp.exp() * lp).sum(-1) for lp in log_p]).mean(0)
    return (-torch.where(log_mean.isneginf(), 0.0, log_mean.exp() * log_mean).sum(-1) - mean_entropy).clamp_min(0.0)
