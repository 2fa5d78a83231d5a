"""The fused parameter store: merging two models of one architecture with a single tensor op."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import torch
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.loading.lora import LoraAdapter, LowRankUpdate


class ParameterViews(nn.Module):
    """Models whose parameters are views into flat buffers of this module. Moving it to another device or dtype moves
    each buffer once and re-points the views; tensor-by-tensor copies would cost as much again."""

    def __init__(self, pretrained: nn.Module) -> None:
        super().__init__()
        self.names = [name for name, _ in pretrained.named_parameters()]
        self.shapes = {name: p.shape for name, p in pretrained.named_parameters()}
        sizes = [p.numel() for p in pretrained.parameters()]
        self.segments: list[tuple[int, int]] = list(zip(itertools.accumulate(sizes, initial=0), sizes))
        """(offset, numel) of every parameter tensor in ``pt_flat``, in ``named_parameters`` order."""
        self.offsets = dict(zip(self.names, (offset for offset, _ in self.segments)))
        self.placements: dict[str, dict[str, tuple[str, int]]] = {}
        """Per model attribute: each parameter's (flat buffer name, offset) it is a view into."""

    def _flat(self, name: str, size: int, reference: torch.Tensor) -> None:
        self.register_buffer(name, reference.new_empty(size), persistent=False)

    @torch.no_grad()
    def _bind(self, attribute: str, model: nn.Module, placement: dict[str, tuple[str, int]], copy_in: bool) -> None:
        """Make ``model`` this store's ``attribute`` with every parameter a view at its placement (copying its values
        in first, tensor by tensor, so that the originals are freed on the way)."""
        self.placements[attribute] = placement
        if not hasattr(self, attribute):
            setattr(self, attribute, model)
        params = dict(model.named_parameters())
        for name, (buffer, offset) in placement.items():
            view = getattr(self, buffer)[offset : offset + self.shapes[name].numel()].view(self.shapes[name])
            if copy_in:
                view.copy_(params[name])
            params[name].data = view

    def _apply(self, fn, recurse: bool = True):
        # Empty the parameters (views) first so that they are not copied one by one as well, then re-point them.
        for attribute in self.placements:
            for param in getattr(self, attribute).parameters():
                param.data = param.data.new_empty(0)
        super()._apply(fn, recurse)
        for attribute, placement in self.placements.items():
            self._bind(attribute, getattr(self, attribute), placement, copy_in=False)
        return self

    @property
    def num_parameters(self) -> int:
        return self.pt_flat.numel()

    merged_buffers: tuple[str, str, str]
    """The flat buffers (θ_pt, θ_ft, merged) ``merge`` interpolates: every parameter, or a LoRA expert's targets."""

    @torch.no_grad()
    def merge(self, weight: float | torch.Tensor) -> nn.Module:
        """Set the working model to (1−w)·θ_pt + w·θ_ft (w = weight on the expert) and return it: one ``lerp``."""
        w = float(weight)
        if w != self.weight:
            pt, ft, merged = (getattr(self, name) for name in self.merged_buffers)
            torch.lerp(pt, ft, w, out=merged)
            self.weight = w
        return self.working


class FusedParameterStore(ParameterViews):
    """θ_pt, θ_ft and the merged θ as three contiguous buffers; three models whose parameters are views.

    ``pretrained``, ``expert`` and ``working`` are ordinary ``nn.Module`` s whose parameters live in
    ``pt_flat``, ``ft_flat`` and ``merged_flat``. ``merge(w)`` writes (1−w)·θ_pt + w·θ_ft into the working
    model with one fused ``torch.lerp`` (θ_pt + w·Δ): no Python loop over tensors, no allocation, no
    ``load_state_dict``. Holding θ_ft rather than Δ keeps memory at three copies of the parameters.
    Buffers (non-learned tensors) are not merged: the working model keeps the pretrained model's.
    """

    merged_buffers = ("pt_flat", "ft_flat", "merged_flat")

    def __init__(self, pretrained: nn.Module, expert: nn.Module) -> None:
        super().__init__(pretrained)
        check_same_parameters(dict(pretrained.named_parameters()), dict(expert.named_parameters()))
        reference = next(pretrained.parameters())
        for name in ("pt_flat", "ft_flat", "merged_flat"):
            self._flat(name, sum(n for _, n in self.segments), reference)
        pretrained, expert = pretrained.requires_grad_(False).eval(), expert.requires_grad_(False).eval()
        working = _copy_without_parameters(pretrained)
        for attribute, model, flat in (
            ("pretrained", pretrained, "pt_flat"),
            ("expert", expert, "ft_flat"),
            ("working", working, "merged_flat"),
        ):
            self._bind(attribute, model, {n: (flat, self.offsets[n]) for n in self.names}, copy_in=model is not working)
        self.merged_flat.copy_(self.pt_flat)
        self.weight: float | None = 0.0

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> nn.Module:
        """Set the working model to a precomputed flat parameter vector (a static merge) and return it."""
        self.merged_flat.copy_(flat)
        self.weight = None
        return self.working


class LowRankStore(ParameterViews):
    """The store of a LoRA expert (θ_ft = θ_pt + s·B·A on the adapter's targets only): no full copy of the expert.

    The expert and working models share every untargeted parameter with the generalist (views into ``pt_flat``);
    only their targets have buffers of their own (``ft_targets``, ``merged_targets``, beside ``pt_targets``, the
    generalist's). A merge is one ``torch.lerp`` over the targets: the same arithmetic as ``FusedParameterStore``'s
    on a materialised expert (lerp leaves an untargeted θ_pt exactly as it is), so both give identical models. The
    expert's targets are computed as ``LoraAdapter.expert`` computes them.
    """

    merged_buffers = ("pt_targets", "ft_targets", "merged_targets")

    def __init__(self, pretrained: nn.Module, adapter: LoraAdapter) -> None:
        super().__init__(pretrained)
        self.adapter = adapter
        self.targets = [n for n in self.names if n in adapter.changed_parameters()]
        sizes = [self.shapes[n].numel() for n in self.targets]
        self.target_offsets = dict(zip(self.targets, itertools.accumulate(sizes, initial=0)))
        reference = next(pretrained.parameters())
        self._flat("pt_flat", sum(n for _, n in self.segments), reference)
        for name in ("pt_targets", "ft_targets", "merged_targets"):
            self._flat(name, sum(sizes), reference)
        pretrained = pretrained.requires_grad_(False).eval()
        expert, working = _copy_without_parameters(pretrained), _copy_without_parameters(pretrained)
        shared = {n: ("pt_flat", self.offsets[n]) for n in self.names}
        self._bind("pretrained", pretrained, shared, copy_in=True)
        for attribute, model, targets in (("expert", expert, "ft_targets"), ("working", working, "merged_targets")):
            own = {n: (targets, self.target_offsets[n]) for n in self.targets}
            self._bind(attribute, model, {**shared, **own}, copy_in=False)
        for i, update in enumerate(adapter.updates):  # the factors, for the low-rank per-sample pass (moved along)
            self.register_buffer(f"down_{i}", update.down.to(reference.dtype), persistent=False)
            self.register_buffer(f"up_{i}", update.up.to(reference.dtype), persistent=False)
        with torch.no_grad():
            for name in self.targets:  # the generalist's values everywhere, then the expert's as the adapter has them
                start, values = self.target_offsets[name], pretrained.get_parameter(name).view(-1)
                for buffer in (self.pt_targets, self.ft_targets, self.merged_targets):
                    buffer[start : start + values.numel()].copy_(values)
            adapter.apply(dict(expert.named_parameters()))
        self.weight: float | None = 0.0

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> nn.Module:
        """Set the working model to a static merge given as a full flat vector: only the targets can differ from θ_pt
        (every static rule leaves a tensor whose Δ is zero as it is), so only they are copied."""
        for name in self.targets:
            offset, size = self.offsets[name], self.shapes[name].numel()
            self.working.get_parameter(name).view(-1).copy_(flat[offset : offset + size])
        self.weight = None
        return self.working

    def updates(self) -> list[LowRankUpdate]:
        """The adapter's low-rank updates with their factors where this store is (device, dtype)."""
        return [
            dataclasses.replace(update, down=getattr(self, f"down_{i}"), up=getattr(self, f"up_{i}"))
            for i, update in enumerate(self.adapter.updates)
        ]

    @property
    def ft_flat(self) -> torch.Tensor:
        """θ_ft as one flat vector, for the static rules: materialised on each access (a full copy), in set-up only."""
        flat = self.pt_flat.clone()
        for name in self.targets:
            offset, size = self.offsets[name], self.shapes[name].numel()
            flat[offset : offset + size] = self.expert.get_parameter(name).view(-1)
        return flat


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
        shown = "; ".join(sorted(problems)[:5])
        raise InputError(
            f"The pretrained and expert models do not have the same parameters ({len(problems)} differences); "
            f"they must share one architecture. First differences: {shown}"
        )
