"""Static merge rules: pure functions of the flat parameter buffers, computed once per run. ``segments`` lists
(offset, numel) of every parameter tensor, for rules that work tensor by tensor. Each names its source."""

from __future__ import annotations

import torch


def interpolate(pt: torch.Tensor, ft: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·θ_pt + w·θ_ft: WiSE-FT (Wortsman et al., CVPR 2022) at a fixed w, and M³ at a random one."""
    return torch.lerp(pt, ft, weight)


def task_arithmetic(pt: torch.Tensor, experts: list[torch.Tensor], scale: float) -> torch.Tensor:
    """θ_pt + s·Σ_k (θ_k − θ_pt) (Ilharco et al., ICLR 2023). With one task vector this is interpolation at s,
    computed by the same fused ``lerp`` (which also extrapolates for s outside [0, 1])."""
    if len(experts) == 1:
        return torch.lerp(pt, experts[0], scale)
    merged = pt.clone()
    for ft in experts:
        merged.add_(ft - pt, alpha=scale)
    return merged


def model_soup(pt: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """The uniform soup of the generalist and its experts, (θ_pt + Σ_k θ_k) / (K + 1) (Wortsman et al., ICML 2022,
    "Model soups"): θ_pt + Σ_k τ_k / (K + 1)."""
    merged = pt.clone()
    for ft in experts:
        merged.add_(ft)
    return merged / (len(experts) + 1)


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
