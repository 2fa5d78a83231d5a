"""The fused parameter store: merging two models of one architecture with a single tensor op."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from tcube_lightning.errors import InputError


class FusedParameterStore(nn.Module):
    """θ_pt, θ_ft and the merged θ as three contiguous buffers; three models whose parameters are views.

    ``pretrained``, ``expert`` and ``working`` are ordinary ``nn.Module`` s whose parameters live in
    ``pt_flat``, ``ft_flat`` and ``merged_flat``. ``merge(w)`` writes (1−w)·θ_pt + w·θ_ft into the working
    model with one fused ``torch.lerp`` (θ_pt + w·Δ): no Python loop over tensors, no allocation, no
    ``load_state_dict``. Holding θ_ft rather than Δ keeps memory at three copies of the parameters.
    Buffers (non-learned tensors) are not merged: the working model keeps the pretrained model's.
    """

    def __init__(self, pretrained: nn.Module, expert: nn.Module) -> None:
        super().__init__()
        check_same_parameters(dict(pretrained.named_parameters()), dict(expert.named_parameters()))
        self.names = [name for name, _ in pretrained.named_parameters()]
        self.shapes = [p.shape for p in pretrained.parameters()]
        sizes = [p.numel() for p in pretrained.parameters()]
        self.segments: list[tuple[int, int]] = list(zip(itertools.accumulate(sizes, initial=0), sizes))
        """(offset, numel) of every parameter tensor in the flat buffers, in ``named_parameters`` order."""
        reference = next(pretrained.parameters())
        for name in ("pt_flat", "ft_flat", "merged_flat"):
            self.register_buffer(name, reference.new_empty(sum(sizes)), persistent=False)
        self.pretrained = pretrained.requires_grad_(False).eval()
        self.expert = expert.requires_grad_(False).eval()
        # Copy tensor by tensor, re-pointing each parameter as soon as it is copied, so that the
        # originals are freed on the way: building the store never holds much more than three copies.
        self._bind_views(copy_in=True)
        self.working = _copy_without_parameters(self.pretrained)
        self._bind_views()
        self.merged_flat.copy_(self.pt_flat)
        self.weight: float | None = 0.0

    def _models(self) -> list[tuple[nn.Module, torch.Tensor]]:
        models = [(self.pretrained, self.pt_flat), (self.expert, self.ft_flat)]
        return models + [(self.working, self.merged_flat)] if hasattr(self, "working") else models

    @torch.no_grad()
    def _bind_views(self, copy_in: bool = False) -> None:
        """Point every parameter of the models at its slice of the matching flat buffer (copying it in first)."""
        for model, flat in self._models():
            params = dict(model.named_parameters())
            for name, shape, (offset, numel) in zip(self.names, self.shapes, self.segments):
                view = flat[offset : offset + numel].view(shape)
                if copy_in:
                    view.copy_(params[name])
                params[name].data = view

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # Moving to another device or dtype replaces the flat buffers. The parameters are only views:
        # empty them first so that they are not copied one by one as well, then re-bind them.
        for model, _ in self._models():
            for param in model.parameters():
                param.data = param.data.new_empty(0)
        super()._apply(fn, recurse)
        self._bind_views()
        return self

    @torch.no_grad()
    def merge(self, weight: float | torch.Tensor) -> nn.Module:
        """Set the working model to (1−w)·θ_pt + w·θ_ft (w = weight on the expert) and return it."""
        w = float(weight)
        if w != self.weight:
            torch.lerp(self.pt_flat, self.ft_flat, w, out=self.merged_flat)
            self.weight = w
        return self.working

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> nn.Module:
        """Set the working model to a precomputed flat parameter vector (a static merge) and return it."""
        self.merged_flat.copy_(flat)
        self.weight = None
        return self.working

    @property
    def num_parameters(self) -> int:
        return self.pt_flat.numel()


def _copy_without_parameters(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters are empty placeholders (to be re-pointed by the caller)."""
    params = list(model.parameters())
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.new_empty(0)
        return copy.deepcopy(model)
    finally:
        for p, data in zip(params, saved):
            p.data = data


def check_same_parameters(pt_params: dict[str, torch.Tensor], ft_params: dict[str, torch.Tensor]) -> None:
    """Raise one clear error listing the first differences in parameter names or shapes."""
    problems = [f"only in the expert: {n}" for n in ft_params if n not in pt_params]
    problems += [f"only in the pretrained model: {n}" for n in pt_params if n not in ft_params]
    for name in pt_params.keys() & ft_params.keys():
        a, b = pt_params[name], ft_params[name]
        if a.shape != b.shape:
            problems.append(f"{name}: pretrained {tuple(a.shape)} vs expert {tuple(b.shape)}")
    if problems:
        shown = "\n  ".join(sorted(problems)[:10])
        raise InputError(
            f"The pretrained and expert models do not have the same parameters ({len(problems)} differences); "
            f"they must share one architecture. First differences:\n  {shown}"
        )


# ---------------------------------------------------------------------------------------------------
# Static merge rules: pure functions of the flat buffers, computed once per run. ``segments`` lists
# (offset, numel) of every parameter tensor, for rules that work tensor by tensor. Each names its source.


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
