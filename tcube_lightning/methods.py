"""The evaluated methods as data: each one turns a batch's shared forwards into logits.

Every method receives the same ``BatchContext``: the pretrained and expert logits (one forward each,
shared by all methods), T³'s per-sample expert weights, and a callable that runs a merged model.
Adding a method means adding one entry to ``build_methods``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from tcube_lightning.coefficients import batch_coefficient


@dataclass(frozen=True)
class BatchContext:
    images: torch.Tensor
    pt_logits: torch.Tensor
    ft_logits: torch.Tensor
    expert_weights: torch.Tensor
    """T³'s per-sample weight on the expert, w(x), already converted from λ(x)."""
    merged_logits: Callable[[torch.Tensor, float], torch.Tensor]
    """(images, w) → logits of the model (1−w)·θ_pt + w·θ_ft."""
    sample_merged_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(images, weights) → logits where sample i runs through the model merged with weights[i]."""


@dataclass(frozen=True)
class Method:
    name: str
    predict: Callable[[BatchContext], torch.Tensor]
    description: str
    static_weight: float | None = None
    """Expert weight of a merge that never changes during a run (its zero-shot head is computed once)."""


def output_ensemble(ctx: BatchContext) -> torch.Tensor:
    """log(½·p_pt + ½·p_ft): the mixture of the two models' class distributions."""
    log_p = torch.log_softmax(ctx.pt_logits.float(), -1)
    log_q = torch.log_softmax(ctx.ft_logits.float(), -1)
    return torch.logaddexp(log_p, log_q) - math.log(2.0)


def per_sample_merge(ctx: BatchContext) -> torch.Tensor:
    """Each sample through the model merged with its own weight (T³)."""
    return ctx.sample_merged_logits(ctx.images, ctx.expert_weights)


def batch_merge(ctx: BatchContext) -> torch.Tensor:
    """The whole batch through one model merged with the batch's mean weight (T³_B)."""
    return ctx.merged_logits(ctx.images, float(batch_coefficient(ctx.expert_weights)))


def build_methods(wise_alpha: float = 0.5) -> dict[str, Method]:
    """Every available method, by name, in the order results are reported."""
    methods = [
        Method("zeroshot", lambda ctx: ctx.pt_logits, "pretrained generalist alone"),
        Method("expert", lambda ctx: ctx.ft_logits, "fine-tuned expert alone"),
        Method("ensemble", output_ensemble, "mean of the two models' probabilities"),
        Method(
            "wise_ft",
            lambda ctx: ctx.merged_logits(ctx.images, wise_alpha),
            f"weight interpolation with fixed expert weight α={wise_alpha}",
            static_weight=wise_alpha,
        ),
        Method("t3", per_sample_merge, "T³: weights merged per sample with λ(x) from JS"),
        Method("t3_batch", batch_merge, "T³_B: one merge per batch at the batch's mean λ"),
    ]
    return {m.name: m for m in methods}


METHOD_NAMES: tuple[str, ...] = tuple(build_methods())
