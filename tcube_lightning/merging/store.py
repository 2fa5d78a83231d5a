"""The fused parameter store: the generalist and K experts of one architecture in flat buffers on the device, and a
working model whose merge θ_pt + Σ_k w_k·(θ_k − θ_pt) is a few fused tensor ops: no loop over tensors, no
allocation, no ``load_state_dict``."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.loading.lora import LoraAdapter, LowRankUpdate
from tcube_lightning.merging.rules import add_task_vectors, stacked_task_vectors

GAP_FILL_FLOATS = 2**17
"""Tensors no expert changed that lie between merged ones, up to this many floats in a row, are merged too (their
merge is the generalist's values): one ``lerp`` call's fixed cost, about 12 µs on this project's CPU, is the time of a
pass over some 130 000 floats, so one pass over the run is quicker than two passes split by them (zero-initialised
biases an expert left as they were, say)."""


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


class ExpertStore(ParameterViews):
    """θ_pt and K experts; models whose parameters are views into flat buffers; one working model to merge into.

    A full expert is a row of every parameter in ``full_flats``, with a model of its own (views into it). A LoRA
    expert (θ_k = θ_pt + s·B·A on its targets, and tensors peft's ``modules_to_save`` replaces) keeps only its factors
    and replaced tensors, the adapter itself. The merge runs over the parameters some expert changes (``merged_flat``:
    the working model's values; a full expert's text tower only where merged models read it), the others staying
    views into the generalist's. With LoRA experts alone, the working model's values of their targets are computed
    when a forward reads them, one module's at a time (``computed``), so the store is the generalist and the adapters:
    nothing else; where a target is read outside any module's forward (open_clip's ``text_projection``) they are
    written into ``merged_flat`` instead. Both use the same operations, so their numbers are the same, bit for bit.
    With one expert the merge is ``torch.lerp`` (θ_pt + w·Δ, a LoRA expert's values written first); with more, the
    full experts folded in by a chain of lerps (``add_task_vectors``) and each LoRA expert's low-rank update added on
    its targets. Buffers (non-learned tensors) are not merged: the working model keeps the pretrained model's.

    Args:
        pretrained: The generalist.
        experts: Each expert: a model of the same architecture, or a LoRA adapter on the generalist.
        text_tower: Whether merged models run their text towers (``merge_text``); without, the full experts' changes
            to the text tower are not merged.
    """

    def __init__(
        self, pretrained: nn.Module, experts: Sequence[nn.Module | LoraAdapter], text_tower: bool = True
    ) -> None:
        super().__init__(pretrained)
        if not experts:
            raise InputError("at least one expert is needed")
        params = dict(pretrained.named_parameters())
        for expert in experts:
            if not isinstance(expert, LoraAdapter):
                check_same_parameters(params, dict(expert.named_parameters()))
        self.adapters = [expert if isinstance(expert, LoraAdapter) else None for expert in experts]
        self.count = len(experts)
        targets = set().union(*(a.changed_parameters() for a in self.adapters if a is not None))
        self.full = any(a is None for a in self.adapters)
        self.full_changes = [
            set()
            if isinstance(expert, LoraAdapter)
            else {n for n, value in expert.named_parameters() if not torch.equal(value, params[n])}
            for expert in experts
        ]
        """Per expert, the parameters it changes if it is a full expert (found once: ``changed`` reads them, the merge
        covers them)."""
        changed_by_full = set().union(*self.full_changes)
        merged = {n for n in changed_by_full if text_tower or image_tower_parameter(n)} | targets
        self.merged_names = (
            _with_small_gaps(self.names, merged, changed_by_full | targets, self.shapes)
            if self.full
            else [n for n in self.names if n in merged]
        )
        """The parameters the merge changes, in ``named_parameters`` order: the LoRA experts' targets (the working
        model is also each LoRA expert's own model, text tower included) and the parameters a full expert changes
        (elsewhere every merge is the generalist, exactly), less the text tower's where merged models keep the
        generalist's head (no forward of theirs reads it)."""
        runners = None if self.full else _runners(pretrained, self.merged_names)
        self.computed = runners is not None
        """LoRA experts alone, each target read in the forward of a module of the model's: the working model's
        values of their targets are computed when that forward runs, not kept (``_targets_in``)."""
        sizes = [0 if self.computed else self.shapes[n].numel() for n in self.merged_names]
        self.merged_offsets = dict(zip(self.merged_names, itertools.accumulate(sizes, initial=0)))
        self.merged_ranges = [] if self.computed else _contiguous_ranges(self.merged_names, self.offsets, self.shapes)
        """The merged parameters as runs of neighbours in ``pt_flat`` (offset there, offset in ``merged_flat``, size):
        every merge is a few passes over each run, one run where every parameter is merged."""
        reference = next(pretrained.parameters())
        self._flat("pt_flat", sum(n for _, n in self.segments), reference)
        self._flat("merged_flat", sum(sizes), reference)
        pretrained = pretrained.requires_grad_(False).eval()
        shared = {n: ("pt_flat", self.offsets[n]) for n in self.names}
        self._bind("pretrained", pretrained, shared, copy_in=True)
        working = _copy_without_parameters(pretrained)
        merged = {} if self.computed else {n: ("merged_flat", o) for n, o in self.merged_offsets.items()}
        self._bind("working", working, {**shared, **merged}, copy_in=False)
        for runner, names in (runners or {}).items():
            module = self.working.get_submodule(runner)
            module.register_forward_pre_hook(functools.partial(self._targets_in, names))
            module.register_forward_hook(functools.partial(self._targets_out, names), always_call=True)
        self.working_parameters = {n: p for n, p in self.working.named_parameters() if self.computed and n in targets}
        """With targets computed: the working model's own parameters of them, put back after each forward."""
        self.merge_kernel: Callable[..., None] | None = None
        """Several full experts' merge compiled (``compile_merge``), or None: the eager chain of lerps."""
        self.full_rows = [k for k, a in enumerate(self.adapters) if a is None]
        """The full experts, in the order of their rows of ``full_flats``."""
        self._flat("full_flats", len(self.full_rows) * self.num_parameters, reference)
        for k, expert in enumerate(experts):
            if isinstance(expert, LoraAdapter):
                self._keep_adapter(k, expert, reference)
            else:
                start = self.full_rows.index(k) * self.num_parameters
                placement = {n: ("full_flats", start + self.offsets[n]) for n in self.names}
                self._bind(f"expert_{k}", expert.requires_grad_(False).eval(), placement, True)
        self.runs: list[MergedRun] | None = None
        if not self.computed:
            self._reset_merged()
        self.weight: tuple[float, ...] | None = (0.0,) * self.count
        self.source: str | torch.Tensor = "merge"
        """What the working model is at ``weight``: a merge, a LoRA expert (``expert``, written as its code writes it),
        or a static merge's flat vector (``weight`` None)."""

    def _runs(self) -> list[MergedRun]:
        """Each run of merged parameters (``merged_ranges``) as views into the buffers where they are now, made once
        (``_apply`` drops them when the buffers move): slicing them anew at each merge cost 20–30 µs on this project's
        CPU, as much as the passes themselves over a merged set of 100 000 floats."""
        if self.runs is None:
            rows = self.full_flats.view(len(self.full_rows), self.num_parameters)
            self.runs = [
                MergedRun(
                    self.pt_flat[start : start + size], rows[:, start : start + size], self.merged_flat[at : at + size]
                )
                for start, at, size in self.merged_ranges
            ]
        return self.runs

    def _apply(self, fn, recurse: bool = True):
        self.runs = None  # views into the buffers as they were
        return super()._apply(fn, recurse)

    def _merged_pairs(self, flat: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(the generalist's values, or those of a full flat vector ``flat``, and the working model's) of each run of
        merged parameters. With LoRA experts alone the generalist's values of their targets are read where they are,
        in ``pt_flat``: no copy of them is kept."""
        for (start, _, size), run in zip(self.merged_ranges, self._runs(), strict=True):
            yield (run.pt if flat is None else flat[start : start + size]), run.merged

    def _reset_merged(self) -> None:
        """The working model's merged parameters back to the generalist's values."""
        for pt, merged in self._merged_pairs():
            merged.copy_(pt)

    def _slice(self, buffer: torch.Tensor, offsets: dict[str, int], name: str) -> torch.Tensor:
        return buffer[offsets[name] : offsets[name] + self.shapes[name].numel()]

    def _keep_adapter(self, k: int, adapter: LoraAdapter, reference: torch.Tensor) -> None:
        """A LoRA expert's factors and replaced tensors as buffers (moved with the store)."""
        for i, update in enumerate(adapter.updates):
            self.register_buffer(f"down_{k}_{i}", update.down.to(reference.dtype), persistent=False)
            self.register_buffer(f"up_{k}_{i}", update.up.to(reference.dtype), persistent=False)
        for i, value in enumerate(adapter.replacements.values()):
            self.register_buffer(f"replaced_{k}_{i}", value.to(reference.dtype), persistent=False)

    def adapter(self, k: int) -> LoraAdapter:
        """LoRA expert k's adapter with its factors and replaced tensors where this store is (device, dtype)."""
        replaced = {name: getattr(self, f"replaced_{k}_{i}") for i, name in enumerate(self.adapters[k].replacements)}
        return dataclasses.replace(self.adapters[k], updates=self.updates(k), replacements=replaced)

    # ---------------------------------------------------------------------------------------------------- models
    @torch.no_grad()
    def expert_model(self, k: int) -> nn.Module:
        """Expert k as a model: a full expert's own, a LoRA expert's values written into the working model (which the
        next merge changes: use it before asking for another)."""
        if self.adapters[k] is None:
            return getattr(self, f"expert_{k}")
        weight = tuple(float(j == k) for j in range(self.count))
        if self.weight != weight:
            if not self.computed:
                self._reset_merged()
                self._apply_adapter(k, self._merged_parameters())
            self.weight, self.source = weight, "expert"
        return self.working

    def _merged_parameters(self) -> dict[str, torch.Tensor]:
        """The working model's merged parameters, by name (views into ``merged_flat``)."""
        return {n: p for n, p in self.working.named_parameters() if n in self.merged_offsets}

    def _apply_adapter(self, k: int, params: dict[str, torch.Tensor]) -> None:
        """LoRA expert k's values of ``params`` (holding the generalist's), as its code writes them: W[rows] += s·B·A,
        replaced tensors copied."""
        self.adapter(k).restricted(params).apply(params)

    def _add_lora_terms(self, w: tuple[float, ...], params: dict[str, torch.Tensor]) -> None:
        """Each LoRA expert's w_k·s·B·A added to ``params`` it targets, and w_k times its replaced tensors' change."""
        for k, adapter in enumerate(self.adapters):
            if adapter is None or w[k] == 0.0:
                continue
            own = self.adapter(k).restricted(params)
            for update in own.updates:
                target = params[update.parameter]
                target = target[slice(*update.rows)] if update.rows else target
                target.addmm_(update.up, update.down, alpha=w[k] * update.scale)
            for name, value in own.replacements.items():
                params[name].add_(value - self.pretrained.get_parameter(name), alpha=w[k])

    def _target_values(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The working model's values of LoRA targets ``names`` as the merge under way has them, computed with the
        same operations as a written merge (bit for bit): a static merge's are views into its flat vector."""
        if isinstance(self.source, torch.Tensor):
            return {n: self._slice(self.source, self.offsets, n).view(self.shapes[n]) for n in names}
        values = {n: self.pretrained.get_parameter(n).clone() for n in names}
        if self.source == "expert":
            self._apply_adapter(self.weight.index(1.0), values)
        elif self.count == 1:
            self._apply_adapter(0, values)
            for name, value in values.items():
                torch.lerp(self.pretrained.get_parameter(name), value, self.weight[0], out=value)
        else:
            self._add_lora_terms(self.weight, values)
        return values

    def _targets_in(self, names: list[str], module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of a module that reads LoRA targets: their values at the merge under way, for this
        forward (one module's at a time, freed after it)."""
        with torch.no_grad():
            for name, value in self._target_values(names).items():
                owner, _, attribute = name.rpartition(".")
                self.working.get_submodule(owner)._parameters[attribute] = value

    def _targets_out(self, names: list[str], module: nn.Module, args: tuple, output: object) -> None:
        """Forward hook (run on errors too): the working model's own parameters back in place."""
        for name in names:
            owner, _, attribute = name.rpartition(".")
            self.working.get_submodule(owner)._parameters[attribute] = self.working_parameters[name]

    def expert_parameters(self, k: int) -> dict[str, torch.Tensor]:
        """Every parameter of expert k by name (a LoRA expert's materialised: a full copy, for set-up work such as
        AdaMerging's)."""
        flat = self.expert_flat(k)
        return {n: self._slice(flat, self.offsets, n).view(self.shapes[n]) for n in self.names}

    # ----------------------------------------------------------------------------------------------------- merges
    @torch.no_grad()
    def merge(self, weights: float | Sequence[float] | torch.Tensor) -> nn.Module:
        """Set the working model to θ_pt + Σ_k w_k·(θ_k − θ_pt) (``weights``: one per expert, or the one expert's)
        and return it."""
        w = tuple(
            float(v)
            for v in (
                weights.tolist()
                if isinstance(weights, torch.Tensor)
                else [weights]
                if isinstance(weights, float | int)
                else weights
            )
        )
        if w == self.weight:
            return self.working
        if self.computed:
            pass  # computed in the forwards that read the targets
        elif self.count == 1 and self.adapters[0] is not None:
            # the expert's values written (unless they are there), then interpolated in place
            if self.weight != (1.0,):
                self._reset_merged()
                self._apply_adapter(0, self._merged_parameters())
            for pt, merged in self._merged_pairs():  # lerp is elementwise: as one pass over their union
                torch.lerp(pt, merged, w[0], out=merged)
        else:
            self._merge_task_vectors(w)
        self.weight, self.source = w, "merge"
        return self.working

    def _merge_task_vectors(self, w: tuple[float, ...]) -> None:
        """θ_pt + Σ_k w_k·τ_k: the full experts' rows streamed by ``add_task_vectors`` (with one expert a single
        ``lerp``), or with several by the compiled kernel where ``compile_merge`` made one (docs/performance.md has
        the measurements against the K-aware floor), then each LoRA expert's
        w_k·s·B·A added on its targets (and w_k times its replaced tensors' change)."""
        full = [w[k] for k in self.full_rows]
        if not full:
            self._reset_merged()
        else:
            weights = self.full_flats.new_tensor(full) if self.merge_kernel is not None and len(full) > 1 else None
            for run in self._runs():
                if weights is None:
                    add_task_vectors(run.pt, run.expert_rows, full, run.merged)
                else:
                    self.merge_kernel(run.pt, run.experts, weights, run.merged)
        if any(adapter is not None for adapter in self.adapters):  # their parameters' views are only built for them
            self._add_lora_terms(w, self._merged_parameters())

    def compile_merge(self) -> None:
        """Merge several full experts in one kernel ``torch.compile`` generates (``stacked_task_vectors``): at the
        K-aware floor, where the eager chain makes K passes (docs/performance.md). Set on the device, once per run
        (compiled functions do not pickle); numbers change at float rounding."""
        self.merge_kernel = torch.compile(stacked_task_vectors, dynamic=False)

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> nn.Module:
        """Set the working model to a precomputed full flat parameter vector (a static merge) and return it: only the
        merged parameters can differ from θ_pt (every static rule leaves a tensor no expert changes as it is). With
        targets computed in the forwards, they are read from ``flat``, which must then stay as it is while in use."""
        if not self.computed:
            for value, merged in self._merged_pairs(flat):
                merged.copy_(value)
        self.weight, self.source = None, flat
        return self.working

    @torch.no_grad()
    def expert_flat(self, k: int) -> torch.Tensor:
        """θ_k as one flat vector of every parameter, for the static rules: a LoRA expert's is materialised on each
        access (a full copy), in set-up only."""
        if self.adapters[k] is None:
            start = self.full_rows.index(k) * self.num_parameters
            return self.full_flats[start : start + self.num_parameters]
        flat = self.pt_flat.clone()
        self.adapter(k).apply({n: self._slice(flat, self.offsets, n).view(self.shapes[n]) for n in self.names})
        return flat

    def stacked(self, name: str) -> torch.Tensor:
        """The full experts' values of parameter ``name``, stacked (full experts × its shape): a view into their rows
        of ``full_flats``, in their order (``full_rows``)."""
        rows = self.full_flats.view(len(self.full_rows), -1)
        offset = self.offsets[name]
        return rows[:, offset : offset + self.shapes[name].numel()].view(-1, *self.shapes[name])

    def expert_flats(self) -> list[torch.Tensor]:
        return [self.expert_flat(k) for k in range(self.count)]

    def updates(self, k: int) -> list[LowRankUpdate]:
        """LoRA expert k's low-rank updates with their factors where this store is (device, dtype)."""
        return [
            dataclasses.replace(update, down=getattr(self, f"down_{k}_{i}"), up=getattr(self, f"up_{k}_{i}"))
            for i, update in enumerate(self.adapters[k].updates)
        ]

    def changed(self, k: int) -> dict[str, torch.Tensor]:
        """Expert k's values of the parameters it changes, by name: a full expert's that differ from θ_pt, a LoRA
        expert's replaced tensors (its low-rank targets are ``updates``)."""
        if self.adapters[k] is not None:
            return dict(self.adapter(k).replacements)
        return {n: p for n, p in self.expert_model(k).named_parameters() if n in self.full_changes[k]}


class MergedRun:
    """One run of merged parameters: the generalist's values, the full experts' (stacked, experts × size, and each
    expert's row), and the working model's: views into the store's buffers."""

    def __init__(self, pt: torch.Tensor, experts: torch.Tensor, merged: torch.Tensor) -> None:
        self.pt, self.experts, self.merged = pt, experts, merged
        self.expert_rows = list(experts)


def image_tower_parameter(name: str) -> bool:
    """Whether parameter ``name`` (open_clip's names) is read by the image tower's forward and the logits: the image
    tower's own, and the logit scale and bias."""
    return name.startswith("visual.") or name in ("logit_scale", "logit_bias")


def _with_small_gaps(names: list[str], merged: set[str], changed: set[str], shapes: dict[str, torch.Size]) -> list[str]:
    """``merged`` in ``names``' order, with each run of unchanged tensors between two of them (at most
    ``GAP_FILL_FLOATS`` floats, none that an expert changed) merged as well."""
    result: list[str] = []
    gap: list[str] = []
    for name in names:
        if name not in merged:
            gap.append(name)
            continue
        if result and not changed.intersection(gap) and sum(shapes[n].numel() for n in gap) <= GAP_FILL_FLOATS:
            result.extend(gap)
        result.append(name)
        gap = []
    return result


def _contiguous_ranges(
    names: list[str], offsets: dict[str, int], shapes: dict[str, torch.Size]
) -> list[tuple[int, int, int]]:
    """``names`` (in flat order) as runs of neighbours: (offset in the flat buffer, offset packed, size) each."""
    ranges: list[list[int]] = []
    packed = 0
    for name in names:
        size = shapes[name].numel()
        if ranges and ranges[-1][0] + ranges[-1][2] == offsets[name]:
            ranges[-1][2] += size
        else:
            ranges.append([offsets[name], packed, size])
        packed += size
    return [(start, merged_start, size) for start, merged_start, size in ranges]


def _runners(model: nn.Module, names: list[str]) -> dict[str, list[str]] | None:
    """Per module, the parameters among ``names`` its forward reads: each one's own module's, or for an
    ``nn.MultiheadAttention``'s out_proj the attention's (its forward reads them); None if one is the model's own
    (read by methods such as ``encode_text``, outside any module's forward)."""
    runners: dict[str, list[str]] = {}
    for name in names:
        owner = name.rpartition(".")[0]
        parent = owner.rpartition(".")[0]
        if owner and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            owner = parent
        if not owner:
            return None
        runners.setdefault(owner, []).append(name)
    return runners


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
