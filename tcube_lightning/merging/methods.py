"""The evaluated methods as data: each one turns a batch's shared forwards into logits.

Every method receives the same ``BatchContext``: the pretrained and expert logits (one forward each,
shared by all methods), T³'s per-sample expert weights, and callables that run merged models. A
static method also names the rule that builds its merged parameters once per run. Adding a method
means adding one entry to ``build_methods``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from tcube_lightning.errors import InputError
from tcube_lightning.merging.coefficients import (
    batch_coefficient,
    cross_entropy_ratio,
    dawin_entropy_ratio,
    log_mixture,
    max_confidence_ratio,
    top_probabilities,
)
from tcube_lightning.merging.rules import dare, interpolate, slerp, task_arithmetic, ties
from tcube_lightning.merging.store import FusedParameterStore

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
    batch_t3_weights: torch.Tensor
    """T³'s weights of the whole batch, whose mean is T³_B's: the rows here, or more where a mixed split's batch is
    evaluated in groups of one class set each."""


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    """What ``--model.methods`` selects; a family may give several columns (WiSE-FT's α values)."""
    description: str
    reference: str
    """The paper or code the method follows."""
    predict: Callable[[BatchContext], torch.Tensor] | None = None
    """Logits for the batch from the shared forwards (output and dynamic methods)."""
    static_rule: Callable[[FusedParameterStore], torch.Tensor] | None = None
    """Static methods: builds the merged flat parameters from the store, once per run."""
    coefficient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """Clustered methods: (pt logits, ft logits, T³ weights) of a whole split → per-sample expert weights; they
    predict in a second pass, once the split's coefficients are all known."""
    weight_source: Literal["t3", "ratio"] | None = None
    """Dynamic methods: where their merge weights come from, T³'s λ mapping or a ratio in [0, 1] (the range
    the zero-shot heads are interpolated over)."""
    per_sample: bool = False
    """Merges per sample (through ``sample_merged_logits``): the methods the sample-wise path serves."""
    merge_weights: Callable[[BatchContext], torch.Tensor] | None = None
    """Dynamic methods of one pass: the expert weight each sample of the batch is merged with."""
    setting: str = ""
    """Methods merging with T³'s weights: the T³ setting, ``""`` the run's own or a ``model.grid`` label."""
    adaptation: Literal["task", "layer"] | None = None
    """AdaMerging: coefficients learnt on the split's images before it is evaluated, one or one per tensor."""

    @property
    def is_static(self) -> bool:
        return self.static_rule is not None

    @property
    def is_adapted(self) -> bool:
        return self.adaptation is not None

    @property
    def is_clustered(self) -> bool:
        return self.coefficient is not None

    def logits(self, ctx: BatchContext) -> torch.Tensor | None:
        """This batch's logits; None for clustered methods."""
        if self.is_static or self.is_adapted:  # a merged model fixed for the split: built once, or learnt
            return ctx.static_logits(ctx.images, self.name)
        return None if self.predict is None else self.predict(ctx)


def output_ensemble(ctx: BatchContext) -> torch.Tensor:
    """log(½·p_pt + ½·p_ft): the mixture of the two models' class distributions."""
    return log_mixture(torch.log_softmax(ctx.pt_logits.float(), -1), torch.log_softmax(ctx.ft_logits.float(), -1))


def confidence_selection(ctx: BatchContext) -> torch.Tensor:
    """Per sample, the logits of whichever model is more confident (ties go to the pretrained model)."""
    c_pt, c_ft = top_probabilities(ctx.pt_logits, ctx.ft_logits)
    return torch.where((c_ft > c_pt).unsqueeze(-1), ctx.ft_logits.float(), ctx.pt_logits.float())


def batch_merge(ctx: BatchContext) -> torch.Tensor:
    """The whole batch through one model merged with the batch's mean T³ weight (T³_B)."""
    return ctx.merged_logits(ctx.images, float(batch_coefficient(ctx.batch_t3_weights)))


def batch_weights(ctx: BatchContext) -> torch.Tensor:
    """T³_B's weight, the batch's mean, for every sample of the batch."""
    return batch_coefficient(ctx.batch_t3_weights).expand(len(ctx.t3_weights))


def _sample_wise(weights: Callable[[BatchContext], torch.Tensor]) -> dict:
    """A method merging each sample with its own weight ``weights(ctx)[i]``: its ``Method`` fields."""
    predict = lambda ctx: ctx.sample_merged_logits(ctx.images, weights(ctx))  # noqa: E731
    return {"predict": predict, "merge_weights": weights, "per_sample": True}


def _ratio(coefficient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[BatchContext], torch.Tensor]:
    return lambda ctx: coefficient(ctx.pt_logits, ctx.ft_logits)


def m3_weight(seed: int) -> float:
    """M³'s random interpolation weight λ ~ U(0, 1), drawn from its own seeded generator."""
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))


T3 = "T³ (arXiv 2510.27265)"
ADAMERGING = "AdaMerging (Yang et al., ICLR 2024), one expert, image tower"
DAWIN = "DaWin (Oh et al., ICLR 2025)"


def build_methods(settings: BaselineSettings = BaselineSettings(), arch: str = "") -> dict[str, Method]:
    """Every available method, by column name, in the order results are reported."""
    s = settings
    t_pt, t_ft = s.dawin_temperatures or DAWIN_TEMPERATURES.get(arch.removesuffix("-quickgelu"), (1.0, 1.0))
    m3 = m3_weight(s.seed)
    methods = [
        Method(
            "zeroshot",
            "zeroshot",
            "pretrained generalist alone",
            "CLIP zero-shot (Radford et al., ICML 2021)",
            lambda ctx: ctx.pt_logits,
        ),
        Method(
            "expert", "expert", "fine-tuned expert alone", "the expert's own predictions", lambda ctx: ctx.ft_logits
        ),
        Method(
            "ensemble",
            "ensemble",
            "mean of the two models' probabilities",
            f"output ensemble, a baseline of {DAWIN}",
            output_ensemble,
        ),
        Method(
            "select",
            "select",
            "per sample, the more confident model",
            "confidence-based model selection",
            confidence_selection,
        ),
    ]
    for alpha in s.wise_alphas:
        methods.append(
            Method(
                f"wise_ft@{alpha:g}",
                "wise_ft",
                f"WiSE-FT, expert weight {alpha:g}",
                "WiSE-FT (Wortsman et al., CVPR 2022)",
                static_rule=lambda st, a=alpha: interpolate(st.pt_flat, st.ft_flat, a),
            )
        )
    methods += [
        Method(
            "slerp",
            "slerp",
            f"per-tensor SLERP, weight {s.slerp_alpha:g}",
            "SLERP per tensor (as in mergekit)",
            static_rule=lambda st: slerp(st.pt_flat, st.ft_flat, s.slerp_alpha, st.segments),
        ),
        Method(
            "task_arithmetic",
            "task_arithmetic",
            f"task arithmetic, scale {s.task_scale:g}",
            "task arithmetic (Ilharco et al., ICLR 2023)",
            static_rule=lambda st: task_arithmetic(st.pt_flat, st.ft_flat, s.task_scale),
        ),
        Method(
            "ties",
            "ties",
            f"TIES, density {s.ties_density:g}, scale {s.ties_scale:g}",
            "TIES-Merging (Yadav et al., NeurIPS 2023)",
            static_rule=lambda st: ties(st.pt_flat, st.ft_flat, s.ties_density, s.ties_scale),
        ),
        Method(
            "dare",
            "dare",
            f"DARE, drop {s.dare_drop:g}, scale {s.dare_scale:g}, seed {s.seed}",
            "DARE (Yu et al., ICML 2024)",
            static_rule=lambda st: dare(st.pt_flat, st.ft_flat, s.dare_drop, s.dare_scale, s.seed),
        ),
        Method(
            "m3",
            "m3",
            f"M³, random weight λ = {m3:.4f} (seed {s.seed})",
            "M³ Mixup Model Merge (Zhou et al., 2025)",
            static_rule=lambda st: interpolate(st.pt_flat, st.ft_flat, m3),
        ),
        Method(
            "t3",
            "t3",
            "T³: weights merged per sample with λ(x) from JS",
            T3,
            weight_source="t3",
            **_sample_wise(lambda ctx: ctx.t3_weights),
        ),
        Method(
            "t3_batch",
            "t3_batch",
            "T³_B: one merge per batch at the batch's mean λ",
            T3,
            batch_merge,
            weight_source="t3",
            merge_weights=batch_weights,
        ),
        Method(
            "dawin",
            "dawin",
            f"DaWin entropy ratio, temperatures ({t_pt:g}, {t_ft:g})",
            DAWIN,
            weight_source="ratio",
            **_sample_wise(_ratio(lambda pt, ft: dawin_entropy_ratio(pt, ft, t_pt, t_ft))),
        ),
        Method(
            "maxconf",
            "maxconf",
            "per-sample merge, max-confidence ratio",
            f"a variant in {DAWIN}",
            weight_source="ratio",
            **_sample_wise(_ratio(max_confidence_ratio)),
        ),
        Method(
            "xent",
            "xent",
            "per-sample merge, X-entropy ratio (ensemble pseudo labels)",
            f"a variant in {DAWIN}",
            weight_source="ratio",
            **_sample_wise(_ratio(cross_entropy_ratio)),
        ),
        Method(
            "t3_cluster",
            "t3_cluster",
            "T³ weights grouped by a Beta mixture, one merge per component",
            f"{T3} with the Beta-mixture clustering of {DAWIN}",
            coefficient=lambda pt, ft, t3: t3,
            weight_source="t3",
        ),
        Method(
            "dawin_cluster",
            "dawin_cluster",
            f"DaWin weights{' with offset adjustment' if s.dawin_offset else ''} grouped by a Beta mixture",
            f"{DAWIN}, Beta-mixture clustering",
            coefficient=lambda pt, ft, t3: dawin_entropy_ratio(pt, ft, t_pt, t_ft, s.dawin_offset),
            weight_source="ratio",
        ),
        Method(
            "adamerging_task",
            "adamerging_task",
            "AdaMerging, one coefficient learnt by entropy minimisation",
            ADAMERGING,
            adaptation="task",
        ),
        Method(
            "adamerging_layer",
            "adamerging_layer",
            "AdaMerging, one coefficient per image-tower tensor",
            ADAMERGING,
            adaptation="layer",
        ),
    ]
    return {m.name: m for m in methods}


def with_grid(methods: dict[str, Method], labels: list[str]) -> dict[str, Method]:
    """``methods`` with, after each one that merges with T³'s weights, a copy per ``model.grid`` setting, named
    ``t3[gamma=4]``: the same method on that setting's weights."""
    expanded = {}
    for name, method in methods.items():
        expanded[name] = method
        for label in labels if method.weight_source == "t3" else ():
            copy = f"{name}[{label}]"
            expanded[copy] = replace(method, name=copy, description=f"{method.description} ({label})", setting=label)
    return expanded


METHOD_FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(m.family for m in build_methods().values()))
DEFAULT_FAMILIES: tuple[str, ...] = tuple(f for f in METHOD_FAMILIES if not f.startswith("adamerging"))
"""What a run evaluates unless ``model.methods`` says: every family but AdaMerging's, which trains at test time
(hundreds of optimiser steps per split), so it is asked for by name."""
