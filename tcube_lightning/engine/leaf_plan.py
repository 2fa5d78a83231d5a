"""Which leaves of a model the per-sample pass (``per_sample.LeafWisePass``) runs per row, with which handler, which
parameters held outside leaves it gives per row, folds or applies after their tower, and why a model cannot run
that way (``leafwise_reason``): read from the model's structure alone, before any pass runs."""

from __future__ import annotations

from torch import nn

from tcube_lightning.loading.contexts import CONTEXT

SCALES = ("logit_scale",)
"""Merged per row by ``logit_scale``, outside the towers."""


FOLDED = {"visual.class_embedding": "visual.positional_embedding"}
"""open_clip's class token (``_expand_token`` views it as one row) → the positional embedding added right after it,
whose first row takes the class token's per-row Δ: [cls + w·Δcls; patches] + pos(w) = [cls; patches] + pos(w) with
pos(w)[0] + w·Δcls."""


PROJECTIONS = {"visual.proj": "encode_image", "text_projection": "encode_text"}
"""open_clip's raw output projections and the encoder each ends: ``pooled @ P`` is skipped when P is None."""


class LeafPlan:
    """How ``LeafWisePass`` runs a model: the handler of each changed leaf, the parameters given per row, the raw
    projections applied after their tower, or why it cannot (``reason``)."""

    def __init__(self) -> None:
        self.leaves: dict[str, str] = {}
        self.per_row: list[str] = []
        self.projections: list[str] = []
        self.reason: str | None = None


def plan_leaves(model: nn.Module, changed: set[str]) -> LeafPlan:
    """Which module runs per row with which handler, which parameters held outside leaves become per-row tensors or
    projections applied per row, and why the model cannot run this way (``reason``, None when it can)."""
    plan = LeafPlan()
    for name, module in model.named_modules():
        recurse = isinstance(module, nn.MultiheadAttention)  # its out_proj's parameters are its own here
        own = {f"{name}.{k}" if name else k for k, _ in module.named_parameters(recurse=recurse)}
        context = {p for p in own & changed if p.endswith(f".{CONTEXT}")}  # used by its hook: given per row
        plan.per_row += sorted(context - set(plan.per_row))
        own = {p for p in own if not p.endswith(f".{CONTEXT}")}
        if not own & changed:
            continue
        kind = _leaf_kind(model, name, module)
        if kind is None:
            plan.reason = _outside_leaves(model, sorted(own & changed), plan)
        elif kind.startswith("!"):
            plan.reason = f"{name}: {kind[1:]}"
        elif kind != "inside attention":  # an nn.MultiheadAttention's out_proj: its attention's handler uses it
            plan.leaves[name] = kind
        if plan.reason is not None:
            return plan
    return plan


def _leaf_kind(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The handler of a leaf this pass knows, ``!why`` for one it cannot run, None for a model's own module (its
    parameters are then used in its own code: given per row, ``_outside_leaves``)."""
    if isinstance(module, nn.MultiheadAttention):
        if not module.batch_first or not module._qkv_same_embed_dim or module.bias_k is not None:
            return "!an attention layer that is not batch-first self-attention with fused q/k/v"
        return "attention"
    if isinstance(module, nn.Linear):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        return "inside attention" if isinstance(model.get_submodule(parent), nn.MultiheadAttention) else "linear"
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return "layer_norm"
    if type(module).__name__ == "LayerScale" and set(dict(module.named_parameters(recurse=False))) == {"gamma"}:
        return "layer_scale"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__module__.startswith("torch.nn"):  # a layer of torch's own this pass does not know
        return f"!a {type(module).__name__}, which this pass cannot run per row"
    return None


def _outside_leaves(model: nn.Module, parameters: list[str], plan: LeafPlan) -> str | None:
    """Changed parameters held outside leaves into ``plan`` (per row, folded or projections); why not, if not."""
    for parameter in parameters:
        shape = tuple(model.get_parameter(parameter).shape)
        if parameter in SCALES:
            continue
        if parameter in PROJECTIONS and len(shape) == 2:
            plan.projections.append(parameter)
        elif parameter in FOLDED:
            if FOLDED[parameter] not in plan.per_row:
                plan.per_row.append(FOLDED[parameter])
        elif not shape:
            return f"{parameter} (a scalar) differs between the models and is outside every leaf this pass knows"
        elif parameter not in plan.per_row:
            plan.per_row.append(parameter)
    return None


def leafwise_reason(model: nn.Module, changed: set[str]) -> str | None:
    """Why ``LeafWisePass`` cannot run ``model`` (None when its structure allows it; a probe confirms)."""
    if getattr(model, "logit_bias", None) is not None:
        return "the model has a logit bias (SigLIP)"
    if not all(hasattr(model, f) for f in ("encode_image", "encode_text", "logit_scale")):
        return f"{type(model).__name__} is not a CLIP (encode_image, encode_text, logit_scale)"
    return plan_leaves(model, changed).reason
