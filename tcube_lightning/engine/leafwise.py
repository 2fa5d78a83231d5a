"""Exact per-sample merging for towers built of leaves whose output is affine in their own parameters: timm's
VisionTransformer and Hugging Face BERT (BiomedCLIP's towers), for full and for LoRA experts.

Given its input x, a leaf such as Linear, Conv2d, LayerNorm, Embedding or LayerScale satisfies
f(x; θ_pt + w·Δ) = f(x; θ_pt) + w·(f(x; θ_ft) − f(x; θ_pt)). Running every leaf so, each row of a batch with its own
w, runs each sample through its own merged network: attention, activations and pooling act on the activations only.
A LoRA target needs only its low-rank term, x·Wᵀ + b + w·s·(x·Aᵀ)·Bᵀ, and a leaf whose parameters are the same in
both models runs once, as it is. Parameters held outside such leaves (timm's ``cls_token`` and ``pos_embed``) that
differ are given per row: their leading dimension of 1 broadcasts over the batch, so the model's own code takes a
leading dimension of B as well. ``nn.MultiheadAttention`` (open_clip's towers, with a LoRA expert) runs split into
its projections, each merged per row, with attention on the activations.

Whether a model's code really keeps rows apart is checked on a probe against per-sample merges (``probe_error``);
what this pass cannot run, it says (``leafwise_reason``), and the loop serves.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tcube_lightning.engine.samplewise import PerSamplePass, row_weights, self_attention
from tcube_lightning.loading.lora import LowRankUpdate

SCALES = ("logit_scale",)
"""Merged per row by ``logit_scale``, outside the towers."""


def changed_parameters(pretrained: nn.Module, expert: nn.Module) -> dict[str, torch.Tensor]:
    """A full expert's parameters that differ from the generalist's, by name: the others need no second pass."""
    ft = dict(expert.named_parameters())
    return {n: ft[n] for n, p in pretrained.named_parameters() if not torch.equal(p, ft[n])}


class LeafWisePass(PerSamplePass):
    """Row i of a batch runs through θ_pt + w_i·Δ, where Δ is given as expert values of changed parameters
    (``dense``: a full expert's, or a LoRA adapter's replaced tensors) and low-rank updates (``low_rank``).

    Args:
        pretrained: The generalist; its leaves' forwards are taken over during a pass, and given back after.
        dense: Changed parameters' expert values, by name.
        low_rank: LoRA updates on Linear weights or ``nn.MultiheadAttention`` projections.
    """

    def __init__(
        self, pretrained: nn.Module, dense: dict[str, torch.Tensor], low_rank: list[LowRankUpdate] = ()
    ) -> None:
        self.pt, self.dense = pretrained, dense
        self.low_rank: dict[str, list[LowRankUpdate]] = defaultdict(list)
        for update in low_rank:
            self.low_rank[update.parameter].append(update)
        self.scales = (pretrained.logit_scale, dense.get("logit_scale", pretrained.logit_scale))
        handlers, self.per_row, reason = plan_leaves(pretrained, set(dense) | set(self.low_rank))
        if reason is not None:
            raise NotImplementedError(reason)
        self.modules = dict(pretrained.named_modules())
        self.forwards = {name: getattr(self, f"_{kind}")(name, self.modules[name]) for name, kind in handlers.items()}
        """Each changed leaf's per-row forward, built once; it reads the rows' weights of the pass under way."""
        self.weights: torch.Tensor | None = None

    def encode_image(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self._rows(weights):
            return F.normalize(self.pt.encode_image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self._rows(weights):
            return F.normalize(self.pt.encode_text(tokens), dim=-1)

    @contextlib.contextmanager
    def _rows(self, weights: torch.Tensor) -> Iterator[None]:
        """During the block, the changed leaves run per row with ``weights`` and the changed parameters held
        outside leaves are per-row tensors; everything is given back after."""
        self.weights = weights
        saved = {}
        try:
            for name, forward in self.forwards.items():
                self.modules[name].forward = forward
            for name in self.per_row:
                owner, attribute = _owner(self.modules, name)
                saved[name] = owner._parameters[attribute]
                owner._parameters[attribute] = self._mix(name, saved[name])
            yield
        finally:
            for name in self.forwards:
                self.modules[name].__dict__.pop("forward", None)
            for name, value in saved.items():
                owner, attribute = _owner(self.modules, name)
                owner._parameters[attribute] = value
            self.weights = None

    # ----------------------------------------------------------------------------------------------- per row
    def _w(self, like: torch.Tensor) -> torch.Tensor:
        if len(like) != len(self.weights):
            raise RuntimeError(f"a leaf saw {len(like)} rows, not the batch's {len(self.weights)}")
        return row_weights(self.weights, like.ndim).to(like.dtype)

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input of one row the model broadcasts over the batch (BERT's position ids), as one row per sample."""
        return x.expand(len(self.weights), *x.shape[1:]) if len(x) == 1 else x

    def _mix(self, name: str, pt: torch.Tensor) -> torch.Tensor:
        """A parameter per row, pt + w_i·Δ, in place of one whose leading dimension of 1 broadcasts."""
        return torch.lerp(pt, self.dense[name], row_weights(self.weights, pt.ndim).to(pt.dtype))

    def _value(self, name: str, pt: torch.Tensor | None) -> torch.Tensor | None:
        return self.dense.get(name, pt)

    def _low_rank_terms(self, y: torch.Tensor, x: torch.Tensor, parameter: str) -> torch.Tensor:
        """y plus w_i·s·(x·Aᵀ)·Bᵀ of every update of ``parameter`` (on its rows of the output, if given): w_i·s
        scales the rank-r activations, and the second product accumulates into y, so the term costs two thin
        products and nothing over the width of y."""
        for update in self.low_rank.get(parameter, ()):
            low = F.linear(x, update.down.to(x.dtype))
            low = low * (self._w(low) * update.scale)
            columns = slice(*update.rows) if update.rows else slice(None)
            y.view(-1, y.shape[-1])[:, columns].addmm_(low.reshape(-1, low.shape[-1]), update.up.to(y.dtype).T)
        return y

    def _linear_rows(
        self,
        x: torch.Tensor,
        prefix: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_name: str = "weight",
        bias_name: str = "bias",
    ) -> torch.Tensor:
        x = self._batch(x)
        y = F.linear(x, weight, bias)
        ft_weight, ft_bias = self._value(prefix + weight_name, weight), self._value(prefix + bias_name, bias)
        if ft_weight is not weight or ft_bias is not bias:
            y = torch.lerp(y, F.linear(x, ft_weight, ft_bias), self._w(y))
        return self._low_rank_terms(y, x, prefix + weight_name)

    def _linear(self, name: str, module: nn.Linear):
        return lambda x: self._linear_rows(x, f"{name}.", module.weight, module.bias)

    def _layer_norm(self, name: str, module: nn.LayerNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            normed = F.layer_norm(self._batch(x), module.normalized_shape, None, None, module.eps)
            w = self._w(normed)
            weight = torch.lerp(module.weight, self._value(f"{name}.weight", module.weight), w)
            if module.bias is None:
                return normed * weight
            return normed * weight + torch.lerp(module.bias, self._value(f"{name}.bias", module.bias), w)

        return forward

    def _layer_scale(self, name: str, module: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            x = self._batch(x)
            return x * torch.lerp(module.gamma, self._value(f"{name}.gamma", module.gamma), self._w(x))

        return forward

    def _conv(self, name: str, module: nn.Conv2d):
        def forward(x: torch.Tensor) -> torch.Tensor:
            x = self._batch(x)
            y = module._conv_forward(x, module.weight, module.bias)
            expert = (self._value(f"{name}.weight", module.weight), self._value(f"{name}.bias", module.bias))
            return torch.lerp(y, module._conv_forward(x, *expert), self._w(y))

        return forward

    def _embedding(self, name: str, module: nn.Embedding):
        def lookup(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            return F.embedding(
                ids,
                table,
                module.padding_idx,
                module.max_norm,
                module.norm_type,
                module.scale_grad_by_freq,
                module.sparse,
            )

        def forward(ids: torch.Tensor) -> torch.Tensor:
            ids = self._batch(ids)
            y = lookup(ids, module.weight)
            return torch.lerp(y, lookup(ids, self._value(f"{name}.weight", module.weight)), self._w(y))

        return forward

    def _attention(self, name: str, module: nn.MultiheadAttention):
        out_proj = module.out_proj

        def forward(query, key, value, need_weights=True, attn_mask=None, **flags):
            padded, causal = flags.get("key_padding_mask") is not None, flags.get("is_causal")
            if key is not query or value is not query or padded or causal:
                raise RuntimeError("only self-attention without key padding or causal flags runs per row")
            qkv = lambda x: self._linear_rows(  # noqa: E731
                x, f"{name}.", module.in_proj_weight, module.in_proj_bias, "in_proj_weight", "in_proj_bias"
            )
            out = lambda x: self._linear_rows(x, f"{name}.out_proj.", out_proj.weight, out_proj.bias)  # noqa: E731
            mask = attn_mask
            if mask is not None:  # nn.MultiheadAttention's boolean masks mark what may not attend, SDPA's what may
                mask = ~mask if mask.dtype == torch.bool else mask.to(query.dtype)
            return self_attention(query, qkv, out, module.num_heads, mask), None

        return forward


def plan_leaves(model: nn.Module, changed: set[str]) -> tuple[dict[str, str], list[str], str | None]:
    """Which module runs per row with which handler, which parameters held outside leaves become per-row tensors,
    and why the model cannot run this way (None when it can)."""
    handlers, per_row = {}, []
    for name, module in model.named_modules():
        recurse = isinstance(module, nn.MultiheadAttention)  # its out_proj's parameters are its own here
        own = {f"{name}.{k}" if name else k for k, _ in module.named_parameters(recurse=recurse)}
        if not own & changed:
            continue
        if isinstance(module, nn.MultiheadAttention):
            if not module.batch_first or not module._qkv_same_embed_dim or module.bias_k is not None:
                return {}, [], f"{name}: an attention layer that is not batch-first self-attention with fused q/k/v"
            handlers[name] = "attention"
        elif isinstance(module, nn.Linear) and not _inside_attention(model, name):
            handlers[name] = "linear"
        elif isinstance(module, nn.Linear):
            continue  # an nn.MultiheadAttention's out_proj: its attention's handler uses it
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            handlers[name] = "layer_norm"
        elif type(module).__name__ == "LayerScale" and set(dict(module.named_parameters(recurse=False))) == {"gamma"}:
            handlers[name] = "layer_scale"
        elif isinstance(module, nn.Conv2d):
            handlers[name] = "conv"
        elif isinstance(module, nn.Embedding):
            handlers[name] = "embedding"
        else:
            for parameter in sorted(own & changed):
                if parameter in SCALES:
                    continue
                shape = tuple(model.get_parameter(parameter).shape)
                if not shape or shape[0] != 1:
                    return (
                        {},
                        [],
                        (
                            f"{parameter} ({type(module).__name__}, shape {shape}) differs between the models and is "
                            "neither in a leaf this pass knows nor batch-broadcast (leading dimension 1)"
                        ),
                    )
                per_row.append(parameter)
    return handlers, per_row, None


def leafwise_reason(model: nn.Module, changed: set[str]) -> str | None:
    """Why ``LeafWisePass`` cannot run ``model`` (None when its structure allows it; a probe confirms)."""
    if getattr(model, "logit_bias", None) is not None:
        return "the model has a logit bias (SigLIP)"
    if not all(hasattr(model, f) for f in ("encode_image", "encode_text", "logit_scale")):
        return f"{type(model).__name__} is not a CLIP (encode_image, encode_text, logit_scale)"
    return plan_leaves(model, changed)[2]


def _inside_attention(model: nn.Module, name: str) -> bool:
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def _owner(modules: dict[str, nn.Module], parameter: str) -> tuple[nn.Module, str]:
    owner, _, attribute = parameter.rpartition(".")
    return modules[owner], attribute
