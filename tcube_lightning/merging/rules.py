"""Merge rules: pure functions of the flat parameter buffers. The static rules are computed once per run; the merge of
task vectors (``add_task_vectors``, ``stacked_task_vectors``) also serves the store's merge per batch. ``segments``
lists (offset, numel) of every parameter tensor, for rules that work tensor by tensor. Each names its source."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def interpolate(pt: torch.Tensor, ft: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·θ_pt + w·θ_ft: WiSE-FT (Wortsman et al., CVPR 2022) at a fixed w, and M³ at a random one."""
    return torch.lerp(pt, ft, weight)


def add_task_vectors(
    pt: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """θ_pt + Σ_k w_k·(θ_k − θ_pt) into ``out``: the one merge of several task vectors (T³_B-K, task arithmetic, the
    soup, the store). It is bandwidth-bound, so what it costs is its passes over memory. With one expert, or convex
    weights (w_k ≥ 0, Σ_k w_k ≤ 1: T³'s rules and the soup), a chain of K ``lerp`` passes: after expert k the running
    vector is the generalist and experts 1..k at their weights divided by c_k = 1 − Σ_{j>k} w_j, so expert k enters
    as ``lerp(P, θ_k, w_k / c_k)`` and c_K = 1 leaves nothing to rescale; each step is a convex combination, rounded
    as one lerp. Other weights (task arithmetic's scale once Σ_k w_k > 1) could make some c_k pass through 0: there
    the generalist is scaled by 1 − Σ_k w_k and each expert added (K + 1 passes)."""
    generalist = 1.0 - sum(weights)
    if len(weights) > 1 and (generalist < 0 or min(weights) < 0):
        torch.mul(pt, generalist, out=out)
        for expert, weight in zip(experts, weights, strict=True):
            out.add_(expert, alpha=weight)
        return out
    source = pt
    for k, (expert, weight) in enumerate(zip(experts, weights, strict=True)):
        if weight != 0:  # a zero weight leaves the chain as it is
            carried = 1.0 - sum(weights[k + 1 :])  # ≥ w_k > 0; exactly 1 at the last expert (one expert: at w)
            torch.lerp(source, expert, weight / carried, out=out)
            source = out
    return out if source is out else out.copy_(pt)


def stacked_task_vectors(pt: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """``add_task_vectors`` as one expression over the stacked experts (K × N) and the weights as a tensor: what
    ``torch.compile`` turns into a single kernel reading the K + 1 vectors once and writing ``out`` (the merge's
    K-aware floor, which K eager passes cannot reach; docs/performance.md), one compilation per run."""
    out.copy_(pt * (1 - weights.sum()) + (experts * weights[:, None]).sum(0))


def task_arithmetic(pt: torch.Tensor, experts: list[torch.Tensor], scale: float) -> torch.Tensor:
    """θ_pt + s·Σ_k (θ_k − θ_pt) (Ilharco et al., ICLR 2023). With one task vector this is interpolation at s, one
    ``lerp`` (which also extrapolates for s outside [0, 1])."""
    return add_task_vectors(pt, experts, [scale] * len(experts), torch.empty_like(pt))


def model_soup(pt: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """The uniform soup of the generalist and its experts, (θ_pt + Σ_k θ_k) / (K + 1) (Wortsman et al., ICML 2022,
    "Model soups"): θ_pt + Σ_k τ_k / (K + 1)."""
    return add_task_vectors(pt, experts, [1 / (len(experts) + 1)] * len(experts), torch.empty_like(pt))


def ties(pt: torch.Tensor, experts: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    """TIES (Yadav et al., NeurIPS 2023): trim each task vector τ_k to its ``density`` fraction of entries largest in
    magnitude (global over all parameters, as the paper's code), elect each entry's sign as that of Σ_k τ̂_k (the
    summed trimmed values: the sign of the larger total mass; a tie the sign most entries elected), average per entry
    the trimmed values that agree with it (the disjoint mean), then θ_pt + s·τ. With one task vector every surviving
    entry agrees with itself, so trimming is the whole effect."""
    trimmed = [_trim(ft - pt, density) for ft in experts]
    if len(trimmed) == 1:
        return pt + scale * trimmed[0]
    elected = torch.sign(torch.stack(trimmed).sum(0))
    elected[elected == 0] = torch.sign(elected.sum())  # a tie takes the majority sign, as the paper's code does
    total, count = torch.zeros_like(pt), torch.zeros_like(pt)
    for tau in trimmed:
        agrees = (torch.sign(tau) == elected) & (tau != 0)
        total += torch.where(agrees, tau, 0.0)
        count += agrees
    return pt + scale * total / count.clamp_min(1.0)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``density`` fraction of entries largest in magnitude set to 0."""
    keep = max(1, round(density * delta.numel()))
    if keep >= delta.numel():
        return delta
    magnitude = delta.abs()
    threshold = magnitude.kthvalue(delta.numel() - keep + 1).values
    return torch.where(magnitude >= threshold, delta, 0.0)


def dare(pt: torch.Tensor, experts: list[torch.Tensor], drop: float, scale: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024) before task arithmetic: drop each entry of each task vector with probability p
    (expert k's mask drawn with seed ``seed + k``), rescale the rest by 1/(1 − p), then θ_pt + s·Σ_k τ̃_k."""
    merged = pt
    for k, ft in enumerate(experts):
        generator = torch.Generator().manual_seed(seed + k)
        keep = (torch.rand(pt.numel(), generator=generator) >= drop).to(pt.device)
        merged = merged + (scale / (1.0 - drop)) * torch.where(keep, ft - pt, 0.0)
    return merged


def slerp(
    pt: torch.Tensor, ft: torch.Tensor, weight: float, segments: list[tuple[int, int]], eps: float = 1e-6
) -> torch.Tensor:
    """SLERP per parameter tensor (Shoemake 1985, as model merging uses it, e.g. mergekit); linear where the two
    tensors are (anti)parallel or tiny."""
    out = torch.empty_like(pt)
    for offset, numel in segments:
        a, b = pt[offset : offset + numel], ft[offset : offset + numel]
        norms = a.norm() * b.norm()
        cos = (a @ b / norms).clamp(-1.0, 1.0) if norms > eps else a.new_tensor(1.0)
        omega = torch.arccos(cos)
        if omega.abs() < eps or (torch.pi - omega).abs() < eps:
            torch.lerp(a, b, weight, out=out[offset : offset + numel])
        else:
            s = torch.sin(omega)
            out[offset : offset + numel] = (torch.sin((1 - weight) * omega) / s) * a + (
                torch.sin(weight * omega) / s
            ) * b
    return out
