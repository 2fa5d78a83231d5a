"""Static merge rules: pure functions of the flat parameter buffers, computed once per run. ``segments`` lists
(offset, numel) of every parameter tensor, for rules that work tensor by tensor. Each names its source."""

from __future__ import annotations

import torch


def interpolate(pt: torch.Tensor, ft: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 − w)·θ_pt + w·θ_ft: WiSE-FT (Wortsman et al., CVPR 2022) at a fixed w, and M³ at a random one."""
    return torch.lerp(pt, ft, weight)


def task_arithmetic(pt: torch.Tensor, ft: torch.Tensor, scale: float) -> torch.Tensor:
    """θ_pt + s·(θ_ft − θ_pt) (Ilharco et al., ICLR 2023). With one task vector this is interpolation at s,
    computed by the same fused ``lerp`` (which also extrapolates for s outside [0, 1])."""
    return torch.lerp(pt, ft, scale)


def ties(pt: torch.Tensor, ft: torch.Tensor, density: float, scale: float) -> torch.Tensor:
    """TIES (Yadav et al., NeurIPS 2023) with one expert: keep the ``density`` fraction of Δ's entries largest in
    magnitude, then θ_pt + s·Δ.

    With a single task vector TIES's sign election keeps every surviving entry, so trimming is the
    whole effect. The trim is global over all parameters, as in the TIES paper's code.
    """
    delta = ft - pt
    keep = max(1, round(density * delta.numel()))
    if keep < delta.numel():
        magnitude = delta.abs()
        threshold = magnitude.kthvalue(delta.numel() - keep + 1).values
        delta = torch.where(magnitude >= threshold, delta, 0.0)
    return pt + scale * delta


def dare(pt: torch.Tensor, ft: torch.Tensor, drop: float, scale: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024): drop each entry of Δ with probability p, rescale the rest by 1/(1 − p), then
    θ_pt + s·Δ."""
    generator = torch.Generator().manual_seed(seed)
    keep = (torch.rand(pt.numel(), generator=generator) >= drop).to(pt.device)
    return pt + (scale / (1.0 - drop)) * torch.where(keep, ft - pt, 0.0)


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
