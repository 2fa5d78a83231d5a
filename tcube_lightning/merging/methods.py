"""The evaluated methods as data: each one turns a batch's shared forwards into logits.

Every method receives the same ``BatchContext``: the pretrained and experts' logits (one forward each, shared by all
methods), T³'s per-sample weights on the experts, and callables that run merged models. A static method also names
the rule that builds its merged parameters once per run. Adding a method means adding one entry to
``build_methods``. With several experts (K > 1, our extension of T³) the methods of two models (WiSE-FT, SLERP, M³,
DaWin's ratios and the clustered methods) are refused by name (``TWO_MODEL``), and the K-vector baselines come in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from tcube_lightning.errors import InputError
from tcube_lightning.merging.batch_rules import (
    BatchContext,
    batch_merge,
    batch_weights,
    confidence_selection,
    dawin_mtl_weights,
    m3_weight,
    output_ensemble,
)
from tcube_lightning.merging.coefficients import (
    cross_entropy_ratio,
    dawin_entropy_ratio,
    max_confidence_ratio,
)
from tcube_lightning.merging.rules import dare, interpolate, model_soup, slerp, task_arithmetic, ties
from tcube_lightning.merging.store import ExpertStore

# DaWin's calibrated softmax temperatures (pretrained, expert) for CLIP architectures, from its code.
DAWIN_TEMPERATURES = {"ViT-B-16": (0.96, 1.0066), "ViT-B-32": (0.9576, 0.9733), "ViT-L-14": (1.0767, 0.9545)}


@dataclass(frozen=True)
class BaselineSettings:
    """Hyper-parameters of the baselines.

    Args:
        wise_alphas: Expert weights of WiSE-FT; one result column per value.
        slerp_alpha: Interpolation weight of per-tensor SLERP.
        task_scale: s in task arithmetic θ_pt + s·Σ_k (θ_k − θ_pt); None: 0.5 with one expert, 0.3 with several
            (the task arithmetic paper's choice for many task vectors).
        ties_density: Fraction of task-vector entries TIES keeps (largest magnitudes).
        ties_scale: s applied to the trimmed task vector.
        dare_drop: Probability p that DARE drops a task-vector entry (the rest are scaled by 1/(1 − p)).
        dare_scale: s applied to the sparsified task vectors, as task arithmetic's; None: 1.0 with one expert (DARE's
            own rescaled vector), 0.3 with several (each vector added whole would overshoot, as in task arithmetic).
        dawin_temperatures: Softmax temperatures (pretrained, expert) for DaWin; None picks DaWin's
            values for ViT-B-16, ViT-B-32 and ViT-L-14 and (1, 1) otherwise.
        dawin_offset: Apply DaWin's offset adjustment in ``dawin_cluster`` (it needs statistics of the
            whole split, which only the two-pass clustered mode has).
        seed: Seed of the random baselines (M³'s coefficient, DARE's mask).
    """

    wise_alphas: list[float] = field(default_factory=lambda: [0.5])
    slerp_alpha: float = 0.5
    task_scale: float | None = None
    ties_density: float = 0.2
    ties_scale: float = 1.0
    dare_drop: float = 0.5
    dare_scale: float | None = None
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
class Method:
    name: str
    family: str
    """What ``--model.methods`` selects; a family may give several columns (WiSE-FT's α values)."""
    description: str
    reference: str
    """The paper or code the method follows."""
    predict: Callable[[BatchContext], torch.Tensor] | None = None
    """Logits for the batch from the shared forwards (output and dynamic methods)."""
    static_rule: Callable[[ExpertStore], torch.Tensor] | None = None
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
    """Dynamic methods of one pass: the weights each sample of the batch is merged with (rows × experts, or one
    expert's vector of rows)."""
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


def _sample_wise(weights: Callable[[BatchContext], torch.Tensor]) -> dict:
    """A method merging each sample with its own weights ``weights(ctx)[i]``: its ``Method`` fields."""
    predict = lambda ctx: ctx.sample_merged_logits(ctx.images, weights(ctx))  # noqa: E731
    return {"predict": predict, "merge_weights": weights, "per_sample": True}


def _ratio(coefficient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[BatchContext], torch.Tensor]:
    return lambda ctx: coefficient(ctx.pt_logits, ctx.ft_logits[0])


T3 = "T³ (arXiv 2510.27265)"
T3_K = "T³ with several experts (our extension of arXiv 2510.27265: model.k_experts)"
EXTENSION = "our extension of T³ to several experts"
"""In the description of each method that is T³ with several experts (the paper merges one generalist with one
expert): what the tables' note under them looks for."""
ADAMERGING = "AdaMerging (Yang et al., ICLR 2024), image tower"
DAWIN = "DaWin (Oh et al., ICLR 2025)"
TWO_MODEL = ("wise_ft", "slerp", "m3", "dawin", "maxconf", "xent", "t3_cluster", "dawin_cluster")
"""Families defined between the generalist and one expert (an interpolation, a ratio of two models' confidences, a
Beta mixture of one coefficient): refused, by name, with several experts."""


def build_methods(
    settings: BaselineSettings = BaselineSettings(), arch: str = "", experts: Sequence[str] = ("expert",)
) -> dict[str, Method]:
    """Every method available with ``experts`` (their names; one: ``expert``), by column name, in the order results
    are reported."""
    s, count = settings, len(experts)
    t_pt, t_ft = s.dawin_temperatures or DAWIN_TEMPERATURES.get(arch.removesuffix("-quickgelu"), (1.0, 1.0))
    m3 = m3_weight(s.seed)
    scale = s.task_scale if s.task_scale is not None else (0.5 if count == 1 else 0.3)
    dare_scale = s.dare_scale if s.dare_scale is not None else (1.0 if count == 1 else 0.3)
    experts_alone = [
        Method(
            "expert" if count == 1 else f"expert:{name}",
            "expert",
            "fine-tuned expert alone" if count == 1 else f"the expert {name!r} alone",
            "the expert's own predictions",
            lambda ctx, k=k: ctx.ft_logits[k],
        )
        for k, name in enumerate(experts)
    ]
    methods = [
        Method(
            "zeroshot",
            "zeroshot",
            "pretrained generalist alone",
            "CLIP zero-shot (Radford et al., ICML 2021)",
            lambda ctx: ctx.pt_logits,
        ),
        *experts_alone,
        Method(
            "ensemble",
            "ensemble",
            "mean of the two models' probabilities" if count == 1 else f"mean of the {count + 1} models' probabilities",
            f"output ensemble, a baseline of {DAWIN}",
            output_ensemble,
        ),
        Method(
            "select",
            "select",
            "per sample, the more confident model" if count == 1 else "per sample, the most confident model",
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
                static_rule=lambda st, a=alpha: interpolate(st.pt_flat, st.expert_flat(0), a),
            )
        )
    methods += [
        Method(
            "slerp",
            "slerp",
            f"per-tensor SLERP, weight {s.slerp_alpha:g}",
            "SLERP per tensor (as in mergekit)",
            static_rule=lambda st: slerp(st.pt_flat, st.expert_flat(0), s.slerp_alpha, st.segments),
        ),
        Method(
            "task_arithmetic",
            "task_arithmetic",
            f"task arithmetic, scale {scale:g}",
            "task arithmetic (Ilharco et al., ICLR 2023)",
            static_rule=lambda st: task_arithmetic(st.pt_flat, st.expert_flats(), scale),
        ),
        Method(
            "ties",
            "ties",
            f"TIES, density {s.ties_density:g}, scale {s.ties_scale:g}",
            "TIES-Merging (Yadav et al., NeurIPS 2023)",
            static_rule=lambda st: ties(st.pt_flat, st.expert_flats(), s.ties_density, s.ties_scale),
        ),
        Method(
            "dare",
            "dare",
            f"DARE, drop {s.dare_drop:g}, scale {dare_scale:g}, seed {s.seed}",
            "DARE (Yu et al., ICML 2024) on each task vector, then task arithmetic",
            static_rule=lambda st: dare(st.pt_flat, st.expert_flats(), s.dare_drop, dare_scale, s.seed),
        ),
        Method(
            "m3",
            "m3",
            f"M³, random weight λ = {m3:.4f} (seed {s.seed})",
            "M³ Mixup Model Merge (Zhou et al., 2025)",
            static_rule=lambda st: interpolate(st.pt_flat, st.expert_flat(0), m3),
        ),
        Method(
            "t3",
            "t3",
            "T³: weights merged per sample with λ(x) from JS"
            if count == 1
            else f"T³-K ({EXTENSION}): per sample, each expert's task vector with its own "
            "λ_k(x) from JS(p_pt ‖ p_k), combined by model.k_experts' rule",
            T3 if count == 1 else T3_K,
            weight_source="t3",
            **_sample_wise(lambda ctx: ctx.t3_weights),
        ),
        Method(
            "t3_batch",
            "t3_batch",
            "T³_B: one merge per batch at the batch's mean λ"
            if count == 1
            else f"T³_B-K ({EXTENSION}): one merge per batch at the batch's mean weight vector",
            T3 if count == 1 else T3_K,
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
            "soup",
            "soup",
            f"uniform model soup of the generalist and {'the expert' if count == 1 else f'the {count} experts'}",
            "model soups (Wortsman et al., ICML 2022)",
            static_rule=lambda st: model_soup(st.pt_flat, st.expert_flats()),
        ),
        Method(
            "dawin_mtl",
            "dawin_mtl",
            "DaWin-MTL: per sample 0.3·K·softmax_k(−H_k) on each task vector",
            f"{DAWIN}, multi-task code (dawin_mtl)",
            weight_source="ratio",
            **_sample_wise(dawin_mtl_weights),
        ),
        Method(
            "adamerging_task",
            "adamerging_task",
            "AdaMerging, one coefficient (per expert) learnt by entropy minimisation",
            ADAMERGING,
            adaptation="task",
        ),
        Method(
            "adamerging_layer",
            "adamerging_layer",
            "AdaMerging, one coefficient per image-tower tensor (and expert)",
            ADAMERGING,
            adaptation="layer",
        ),
    ]
    return {m.name: m for m in methods if count == 1 or m.family not in TWO_MODEL}


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
OPT_IN: tuple[str, ...] = ("adamerging_task", "adamerging_layer")
"""AdaMerging's families train at test time (hundreds of optimiser steps per split): asked for by name."""
ONE_EXPERT_DEFAULTS = tuple(f for f in METHOD_FAMILIES if f not in (*OPT_IN, "soup", "dawin_mtl"))
"""What a one-expert run evaluates unless ``model.methods`` says (the K-vector baselines on request: with one
expert the soup is WiSE-FT at ½, and DaWin-MTL a fixed 0.3)."""
K_EXPERT_DEFAULTS = tuple(f for f in METHOD_FAMILIES if f not in (*OPT_IN, *TWO_MODEL))
"""What a run of several experts evaluates unless ``model.methods`` says."""
