"""What the output and dynamic methods compute from one batch (``BatchContext``): the ensemble and selection of the
models' outputs, T³_B's batch merge and the per-sample weights of DaWin-MTL; M³'s seeded weight."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tcube_lightning.merging.coefficients import batch_coefficient, entropy, log_mixture, top_probabilities


@dataclass(frozen=True)
class BatchContext:
    images: torch.Tensor
    pt_logits: torch.Tensor
    ft_logits: torch.Tensor
    """The experts' logits: experts × rows × classes."""
    t3_weights: torch.Tensor
    """T³'s per-sample weights on the experts, w(x) (rows × experts), already converted from λ(x)."""
    merged_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(images, w) → logits of the model θ_pt + Σ_k w_k·(θ_k − θ_pt) (w: one per expert)."""
    sample_merged_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(images, weights) → logits where sample i runs through the model merged with weights[i] (rows × experts, or
    one expert's vector of rows)."""
    static_logits: Callable[[torch.Tensor, str], torch.Tensor]
    """(images, method name) → logits of that static method's precomputed merged model."""
    batch_t3_weights: torch.Tensor
    """T³'s weights of the whole batch, whose mean is T³_B's: the rows here, or more where a mixed split's batch is
    evaluated in groups of one class set each."""


def output_ensemble(ctx: BatchContext) -> torch.Tensor:
    """log of the mean of the generalist's and every expert's class distributions (½·p_pt + ½·p_ft with one)."""
    log_p = [torch.log_softmax(logits.float(), -1) for logits in (ctx.pt_logits, *ctx.ft_logits)]
    if len(log_p) == 2:
        return log_mixture(*log_p)
    return torch.logsumexp(torch.stack(log_p), dim=0) - math.log(len(log_p))


def confidence_selection(ctx: BatchContext) -> torch.Tensor:
    """Per sample, the logits of whichever model is most confident, the generalist or an expert (ties go to the
    generalist, then to the first expert)."""
    if len(ctx.ft_logits) == 1:
        c_pt, c_ft = top_probabilities(ctx.pt_logits, ctx.ft_logits[0])
        return torch.where((c_ft > c_pt).unsqueeze(-1), ctx.ft_logits[0].float(), ctx.pt_logits.float())
    logits = torch.stack([ctx.pt_logits, *ctx.ft_logits]).float()
    confidence = torch.log_softmax(logits, -1).max(-1).values  # models × rows
    chosen = confidence.argmax(0)  # the first of equal maxima
    return logits[chosen, torch.arange(logits.shape[1], device=logits.device)]


def batch_merge(ctx: BatchContext) -> torch.Tensor:
    """The whole batch through one model merged with the batch's mean T³ weights (T³_B)."""
    return ctx.merged_logits(ctx.images, batch_coefficient(ctx.batch_t3_weights))


def batch_weights(ctx: BatchContext) -> torch.Tensor:
    """T³_B's weights, the batch's mean, for every sample of the batch."""
    return batch_coefficient(ctx.batch_t3_weights).expand(len(ctx.t3_weights), -1)


DAWIN_MTL_BUDGET = 0.3
"""DaWin-MTL's weight per task vector before routing (task arithmetic's budget): its weights lie in (0, 0.3·K)."""


def dawin_mtl_weights(ctx: BatchContext) -> torch.Tensor:
    """DaWin-MTL's weights (naver-ai/dawin, ``dawin_mtl/src/main_dawin.py``, ``DaWin.lambdas``): per sample
    0.3·K·softmax_k(−H(p_k)) on each expert's task vector, the generalist's weight fixed at 1 (task arithmetic's
    budget 0.3 per task vector, routed by the experts' confidence)."""
    count = len(ctx.ft_logits)
    return DAWIN_MTL_BUDGET * count * torch.softmax(-torch.stack([entropy(x) for x in ctx.ft_logits], dim=-1), dim=-1)


def m3_weight(seed: int) -> float:
    """M³'s random interpolation weight λ ~ U(0, 1), drawn from its own seeded generator."""
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
