"""The fused parameter store: merging two models of one architecture with a single tensor op."""

from __future__ import annotations

import copy

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
        names = [name for name, _ in pretrained.named_parameters()]
        ft_params = dict(expert.named_parameters())
        with torch.no_grad():
            pt_flat = torch.cat([p.detach().reshape(-1) for p in pretrained.parameters()])
            ft_flat = torch.cat([ft_params[n].detach().reshape(-1) for n in names]).to(pt_flat.dtype)
        self.register_buffer("pt_flat", pt_flat, persistent=False)
        self.register_buffer("ft_flat", ft_flat, persistent=False)
        self.register_buffer("merged_flat", pt_flat.clone(), persistent=False)
        self.pretrained = pretrained.requires_grad_(False).eval()
        self.expert = expert.requires_grad_(False).eval()
        self.working = copy.deepcopy(pretrained)
        self._names = names
        self.weight: float | None = 0.0
        self._bind_views()

    def _bind_views(self) -> None:
        """Point every parameter of the three models at its slice of the matching flat buffer."""
        for model, flat in (
            (self.pretrained, self.pt_flat),
            (self.expert, self.ft_flat),
            (self.working, self.merged_flat),
        ):
            params = dict(model.named_parameters())
            offset = 0
            for name in self._names:
                param = params[name]
                param.data = flat[offset : offset + param.numel()].view_as(param)
                offset += param.numel()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # Moving to another device or dtype replaces the buffers: re-bind the views afterwards.
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

    @property
    def num_parameters(self) -> int:
        return self.pt_flat.numel()


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
