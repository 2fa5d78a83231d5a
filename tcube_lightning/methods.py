"""The evaluated methods as data: each one turns a batch's shared forwards into logits.

Every method receives the same ``BatchContext``: the pretrained and expert logits (one forward each,
shared by all methods), T³'s per-sample expert weights, and callables that run merged models. A
static method also names the rule that builds its merged parameters once per run. Adding a method
means adding one entry to ``build_methods``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from tcube_lightning.coefficients import (
    batch_coefficient,
    cross_entropy_ratio,
    dawin_entropy_ratio,
    max_confidence_ratio,
)
from tcube_lightning.errors import InputError
from tcube_lightning.merging import FusedParameterStore, dare, slerp, ties

# DaWin's calibrated softmax temperatures (pretrained, expert) for CLIP architectures, from its code.
DAWIN_TEMPERATURES = {"ViT-B-16": (0.96, 1.0066), "ViT-B-32": (0.9576, 0.9733), "ViT-L-14": (1.0767, 0.9545)}


@dataclass(frozen=True)
class BaselineSettings:
    """Hyper-parameters of the baselines.

    Args:
        wise_alphas: Expert weights of WiSE-FT; one result column per value.
        slerp_alpha: Interpolation weight of per-tensor SLERP.
        task_scale: s in task arithmetic θ_pt + s·(θ_ft − θ_pt).
        ties_density: Fraction of task-vector entries TIES keeps (largest magnitudes).
        ties_scale: s applied to the trimmed task vector.
        dare_drop: Probability p that DARE drops a task-vector entry (the rest are scaled by 1/(1 − p)).
        dare_scale: s applied to the sparsified task vector.
        dawin_temperatures: Softmax temperatures (pretrained, expert) for DaWin; None picks DaWin's
            values for ViT-B-16, ViT-B-32 and ViT-L-14 and (1, 1) otherwise.
        dawin_offset: Apply DaWin's offset adjustment in ``dawin_cluster`` (it needs statistics of the
            whole split, which only the two-pass clustered mode has).
        seed: Seed of the random baselines (M³'s coefficient, DARE's mask).
    """

    wise_alphas: list[float] = field(default_factory=lambda: [0.5])
    slerp_alpha: float = 0.5
    task_scale: float = 0.5
    ties_density: float = 0.2
    ties_scale: float = 1.0
    dare_drop: float = 0.5
    dare_scale: float = 1.0
    dawin_temperatures: tuple[float, float] | None = None
    dawin_offset: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject values outside their ranges, naming the option, before any work starts."""
        problems = [f"wise_alphas {a} not in [0, 1]" for a in self.wise_alphas if not 0.0 <= a <= 1.0]
        if not 0.0 <= self.slerp_alpha <= 1.0:
            problems.append(f"slerp_alpha {self.slerp_alpha} not in [0, 1]")
        if not 0.0 < self.ties_density <= 1.0:
            problems.append(f"ties_density {self.ties_density} not in (0, 1]")
        if not 0.0 <= self.dare_drop < 1.0:
            problems.append(f"dare_drop {self.dare_drop} not in [0, 1)")
        if self.dawin_temperatures is not None and min(self.dawin_temperatures) <= 0:
            problems.append(f"dawin_temperatures {self.dawin_temperatures} must be > 0")
        if problems:
            raise InputError("model.baselines: " + "; ".join(problems))


@dataclass(frozen=True)
class BatchContext:
    images: torch.Tensor
    pt_logits: torch.Tensor
    ft_logits: torch.Tensor
    t3_weights: torch.Tensor
    """T³'s per-sample weight on the expert, w(x), already converted from λ(x)."""
    merged_logits: Callable[[torch.Tensor, float], torch.Tensor]
    """(images, w) → logits of the model (1−w)·θ_pt + w·θ_ft."""
    sample_merged_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(images, weights) → logits where sample i runs through the model merged with weights[i]."""
    static_logits: Callable[[torch.Tensor, str], torch.Tensor]
    """(images, method name) → logits of that static method's precomputed merged model."""


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    """What ``--model.methods`` selects; a family may give several columns (WiSE-FT's α values)."""
    kind: str
    """output (combines the two forwards), static (one merge per run), per_batch, per_sample or clustered."""
    description: str
    predict: Callable[[BatchContext], torch.Tensor] | None
    """Logits for the batch; None for clustered methods, which predict in a second pass."""
    static_rule: Callable[[FusedParameterStore], torch.Tensor] | None = None
    """Static methods: builds the merged flat parameters from the store, once per run."""
    coefficient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """Clustered methods: (pt logits, ft logits, T³ weights) of a whole split → per-sample expert weights."""


def output_ensemble(ctx: BatchContext) -> torch.Tensor:
    """log(½·p_pt + ½·p_ft): the mixture of the two models' class distributions."""
    log_p = torch.log_softmax(ctx.pt_logits.float(), -1)
    log_q = torch.log_softmax(ctx.ft_logits.float(), -1)
    return torch.logaddexp(log_p, log_q) - math.log(2.0)


def confidence_selection(ctx: BatchContext) -> torch.Tensor:
    """Per sample, the logits of whichever model is more confident (ties go to the pretrained model)."""
    c_pt = torch.softmax(ctx.pt_logits.float(), -1).max(-1).values
    c_ft = torch.softmax(ctx.ft_logits.float(), -1).max(-1).values
    return torch.where((c_ft > c_pt).unsqueeze(-1), ctx.ft_logits.float(), ctx.pt_logits.float())


def per_sample_merge(ctx: BatchContext) -> torch.Tensor:
    """Each sample through the model merged with its own T³ weight."""
    return ctx.sample_merged_logits(ctx.images, ctx.t3_weights)


def batch_merge(ctx: BatchContext) -> torch.Tensor:
    """The whole batch through one model merged with the batch's mean T³ weight (T³_B)."""
    return ctx.merged_logits(ctx.images, float(batch_coefficient(ctx.t3_weights)))


def _sample_wise(
    coefficient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[BatchContext], torch.Tensor]:
    return lambda ctx: ctx.sample_merged_logits(ctx.images, coefficient(ctx.pt_logits, ctx.ft_logits))


def _static(name: str) -> Callable[[BatchContext], torch.Tensor]:
    return lambda ctx: ctx.static_logits(ctx.images, name)


def m3_weight(seed: int) -> float:
    """M³'s random interpolation weight λ ~ U(0, 1), drawn from its own seeded generator."""
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))


def build_methods(settings: BaselineSettings = BaselineSettings(), arch: str = "") -> dict[str, Method]:
    """Every available method, by column name, in the order results are reported."""
    s = settings
    t_pt, t_ft = s.dawin_temperatures or DAWIN_TEMPERATURES.get(arch.removesuffix("-quickgelu"), (1.0, 1.0))
    m3 = m3_weight(s.seed)
    dawin = lambda ctx: dawin_entropy_ratio(ctx.pt_logits, ctx.ft_logits, t_pt, t_ft)  # noqa: E731
    methods = [
        Method("zeroshot", "zeroshot", "output", "pretrained generalist alone", lambda ctx: ctx.pt_logits),
        Method("expert", "expert", "output", "fine-tuned expert alone", lambda ctx: ctx.ft_logits),
        Method("ensemble", "ensemble", "output", "mean of the two models' probabilities", output_ensemble),
        Method("select", "select", "output", "per sample, the more confident model", confidence_selection),
    ]
    for alpha in s.wise_alphas:
        name = f"wise_ft@{alpha:g}"
        rule = lambda store, a=alpha: torch.lerp(store.pt_flat, store.ft_flat, a)  # noqa: E731
        methods.append(Method(name, "wise_ft", "static", f"WiSE-FT, expert weight {alpha:g}", _static(name), rule))
    statics = [
        ("slerp", f"per-tensor SLERP, weight {s.slerp_alpha:g}",
         lambda store: slerp(store.pt_flat, store.ft_flat, s.slerp_alpha, store.segments)),
        ("task_arithmetic", f"task arithmetic, scale {s.task_scale:g}",
         lambda store: torch.lerp(store.pt_flat, store.ft_flat, s.task_scale)),
        ("ties", f"TIES, density {s.ties_density:g}, scale {s.ties_scale:g}",
         lambda store: ties(store.pt_flat, store.ft_flat, s.ties_density, s.ties_scale)),
        ("dare", f"DARE, drop {s.dare_drop:g}, scale {s.dare_scale:g}, seed {s.seed}",
         lambda store: dare(store.pt_flat, store.ft_flat, s.dare_drop, s.dare_scale, s.seed)),
        ("m3", f"M³, random weight λ = {m3:.4f} (seed {s.seed})",
         lambda store: torch.lerp(store.pt_flat, store.ft_flat, m3)),
    ]  # fmt: skip
    methods += [Method(name, name, "static", text, _static(name), rule) for name, text, rule in statics]
    methods += [
        Method("t3", "t3", "per_sample", "T³: weights merged per sample with λ(x) from JS", per_sample_merge),
        Method("t3_batch", "t3_batch", "per_batch", "T³_B: one merge per batch at the batch's mean λ", batch_merge),
        Method("dawin", "dawin", "per_sample", f"DaWin entropy ratio, temperatures ({t_pt:g}, {t_ft:g})",
               lambda ctx: ctx.sample_merged_logits(ctx.images, dawin(ctx))),
        Method("maxconf", "maxconf", "per_sample", "per-sample merge, max-confidence ratio",
               _sample_wise(max_confidence_ratio)),
        Method("xent", "xent", "per_sample", "per-sample merge, X-entropy ratio (ensemble pseudo labels)",
               _sample_wise(cross_entropy_ratio)),
    ]  # fmt: skip
    methods += [
        Method("t3_cluster", "t3_cluster", "clustered", "T³ weights grouped by a Beta mixture, one merge per component",
               None, coefficient=lambda pt, ft, t3: t3),
        Method("dawin_cluster", "dawin_cluster", "clustered",
               f"DaWin weights{' with offset adjustment' if s.dawin_offset else ''} grouped by a Beta mixture",
               None, coefficient=lambda pt, ft, t3: dawin_entropy_ratio(pt, ft, t_pt, t_ft, s.dawin_offset)),
    ]  # fmt: skip
    return {m.name: m for m in methods}


METHOD_FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(m.family for m in build_methods().values()))
