"""Exact per-sample merging in one batched pass, for every tower built of leaves whose output is affine in their own
parameters: open_clip's ViT and text transformer, timm's VisionTransformer and Hugging Face BERT (BiomedCLIP), for
full and for LoRA experts.

Given its input x, a leaf such as Linear, Conv2d, LayerNorm, Embedding or LayerScale satisfies
f(x; θ_pt + w·Δ) = f(x; θ_pt) + w·(f(x; θ_ft) − f(x; θ_pt)). Running every leaf so, each row of a batch with its own
w, runs each sample through its own merged network, exactly: attention, activations and pooling act on the
activations only. A LoRA target needs only its low-rank term, x·Wᵀ + b + w·s·(x·Aᵀ)·Bᵀ, and a leaf whose parameters
are the same in both models runs once, as it is. ``nn.MultiheadAttention`` (open_clip's towers) runs split into its
projections, each merged per row, with attention on the activations (q·kᵀ is not affine in the parameters).

Parameters held outside leaves that differ are given per row, with a batch dimension in front where the model's code
broadcasts (timm's ``cls_token`` and ``pos_embed``, open_clip's positional embeddings). Two of open_clip's need a word
of their own: its class token, which its code cannot take one per row, is folded into the positional embedding's
first row added right after it (``FOLDED``), and its raw output projections (``x @ P`` after pooling) are taken out
of the towers during a pass and applied per row after them (``PROJECTIONS``).

Whether a model's code really keeps rows apart is checked by the engine on a probe against per-sample merges; what
this pass cannot run, it says (``leafwise_reason``), and the loop (``per_sample_loop``) serves.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tcube_lightning.engine.leaf_plan import FOLDED, PROJECTIONS, plan_leaves
from tcube_lightning.engine.row_merge import RowWeightMerge, min_tokens
from tcube_lightning.loading.lora import LowRankUpdate


def per_sample_loop(
    merged_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Each sample through the model merged with its own weights (rows × experts); samples sharing them share a
    merge."""
    unique, group = torch.unique(weights, dim=0, return_inverse=True)
    logits = None
    for k, weight in enumerate(unique):
        index = (group == k).nonzero().squeeze(1)
        part = merged_logits(images[index], weight)
        if logits is None:
            logits = part.new_empty(len(images), part.shape[1])
        logits[index] = part
    return logits


def self_attention(
    x: torch.Tensor,
    qkv: Callable[[torch.Tensor], torch.Tensor],
    out: Callable[[torch.Tensor], torch.Tensor],
    heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """nn.MultiheadAttention's self-attention (batch first) with its projections given as functions, so that each
    can merge per row: attention itself acts on the activations only."""
    rows, length, width = x.shape
    q, k, v = qkv(x).view(rows, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out(attended.transpose(1, 2).reshape(rows, length, width))


def with_complement(weights: torch.Tensor) -> torch.Tensor:
    """Rows of the experts' weights (rows × K) with the generalist's 1 − Σ_k w_ik after them (rows × (K + 1))."""
    return torch.cat([weights, 1.0 - weights.sum(dim=1, keepdim=True)], dim=1)


def changed_parameters(pretrained: nn.Module, expert: nn.Module) -> dict[str, torch.Tensor]:
    """A full expert's parameters that differ from the generalist's, by name: the others need no second pass."""
    ft = dict(expert.named_parameters())
    return {n: ft[n] for n, p in pretrained.named_parameters() if not torch.equal(p, ft[n])}


class LeafWisePass:
    """Row i of a batch runs through θ_pt + Σ_k w_ik·Δ_k, K experts' task vectors Δ_k each given as expert values of
    changed parameters (``dense``: a full expert's, or a LoRA adapter's replaced tensors) and low-rank updates
    (``low_rank``). Every leaf computes f(x; θ_pt) once and each expert's f(x; θ_k) only where that expert changes it:
    with one expert ``torch.lerp`` (θ_pt + w·Δ), with more f(x; θ_pt) + Σ_k w_ik·(f(x; θ_k) − f(x; θ_pt)). With
    full experts alone (``stacked``), a Linear or Conv2d leaf of many tokens per row merges its weight per row instead,
    by one rule for every K (``row_merge.min_tokens``).

    Args:
        pretrained: The generalist; its leaves' forwards are taken over during a pass, and given back after.
        dense: Per expert, its changed parameters' values, by name.
        low_rank: Per expert, its LoRA updates on Linear weights, ``nn.MultiheadAttention`` projections or raw
            projections.
        stacked: Where every expert is a full one: per changed parameter, the experts' values stacked (experts ×
            shape; views into the store's rows, not copies).
    """

    def __init__(
        self,
        pretrained: nn.Module,
        dense: list[dict[str, torch.Tensor]],
        low_rank: list[list[LowRankUpdate]] | None = None,
        stacked: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.pt, self.dense, self.count = pretrained, dense, len(dense)
        self.row_weights = RowWeightMerge(stacked or {}, min_tokens(self.count))
        self.low_rank: list[dict[str, list[LowRankUpdate]]] = [defaultdict(list) for _ in dense]
        for k, updates in enumerate(low_rank or [[] for _ in dense]):
            for update in updates:
                self.low_rank[k][update.parameter].append(update)
        changed = set().union(*(set(d) | set(u) for d, u in zip(dense, self.low_rank, strict=True)))
        plan = plan_leaves(pretrained, changed)
        if plan.reason is not None:
            raise NotImplementedError(plan.reason)
        self.per_row, self.projections = plan.per_row, plan.projections
        self.modules = dict(pretrained.named_modules())
        self.forwards = {
            name: getattr(self, f"_{kind}")(name, self.modules[name]) for name, kind in plan.leaves.items()
        }
        """Each changed leaf's per-row forward, built once; it reads the rows' weights of the pass under way."""
        self.weights: torch.Tensor | None = None
        self.runs: torch.Tensor | None = None
        """Where the pass's rows come in runs of equal weights (a text pass's prompts of each head), each run's
        weights and their complement 1 − Σ_k w_ik last (runs × (K + 1)): the leaves merged per row then merge once per
        run."""
        self.columns: torch.Tensor | None = None
        """The pass's per-row weights of each expert, and their complement 1 − Σ_k w_ik last ((K + 1) × rows)."""
        self.shaped_columns: dict[int, tuple[torch.Tensor, ...]] = {}
        """``columns`` shaped to broadcast against tensors of 1 to 4 dimensions, made once per pass: at the tiny
        models' widths an operation's fixed cost is what a leaf pays, so the pass does not repeat them per leaf."""

    # ------------------------------------------------------------------------------------------------ towers
    def encode_image(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings; row i uses the experts' weights ``weights[i]`` (rows × experts)."""
        return self._encode("encode_image", images, weights)

    def encode_text(self, tokens: torch.Tensor, weights: torch.Tensor, rows_per_weight: int = 1) -> torch.Tensor:
        """Normalised text embeddings; row i uses the experts' weights ``weights[i // rows_per_weight]`` (each weight
        vector's rows side by side, as a head's prompts: its leaves merged per row merge once per weight vector)."""
        if rows_per_weight == 1:
            return self._encode("encode_text", tokens, weights)
        return self._encode("encode_text", tokens, weights.repeat_interleave(rows_per_weight, dim=0), weights)

    def _encode(
        self, encoder: str, inputs: torch.Tensor, weights: torch.Tensor, runs: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self._rows(weights, runs) as projections:
            features = getattr(self.pt, encoder)(inputs)
            for name, pt in projections.items():
                if PROJECTIONS[name] == encoder:
                    features = self._project(features, name, pt)
        return F.normalize(features, dim=-1)

    def _project(self, x: torch.Tensor, name: str, pt: torch.Tensor) -> torch.Tensor:
        """x @ P per row: each expert's full P mixed in, and each LoRA term w_ik·s·(x @ up) @ down (an update of a raw
        projection is given in its own orientation: P += s·up @ down)."""
        y = self._mix(x @ pt, [None if name not in d else x @ d[name] for d in self.dense])
        for k, updates in enumerate(self.low_rank):
            for update in updates.get(name, ()):
                low = (x @ update.up.to(x.dtype)) * (self._w(k, x) * update.scale)
                y = y + low @ update.down.to(x.dtype)
        return y

    def logit_scale(self, weights: torch.Tensor) -> torch.Tensor:
        """exp of the per-row merged logit scale (it enters through exp, so it is merged before)."""
        with self._weights(weights):
            pt = self.pt.logit_scale
            scale = self._mix(pt.expand(len(weights)), [d.get("logit_scale") for d in self.dense])
        return scale.exp()

    def zero_shot_heads(
        self, prompt_tokens: torch.Tensor, weights: torch.Tensor, num_classes: int, chunk: int = 4096
    ) -> torch.Tensor:
        """Heads (len(weights), classes, dim): every prompt through the text tower merged at each weight vector, in
        passes of about ``chunk`` rows (whole heads' prompts)."""
        prompts = len(prompt_tokens)
        step = max(1, chunk // prompts)
        text = torch.cat(
            [self.encode_text(prompt_tokens.repeat(len(w), 1), w, rows_per_weight=prompts) for w in weights.split(step)]
        )
        text = text.view(len(weights), num_classes, prompts // num_classes, -1).mean(dim=2)
        return F.normalize(text, dim=-1)

    def logits(
        self,
        images: torch.Tensor,
        weights: torch.Tensor,
        prompt_tokens: torch.Tensor | None,
        num_classes: int,
        fixed_head: torch.Tensor | None = None,
        row_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Zero-shot logits with per-sample merged towers (``weights``: rows × experts); ``fixed_head`` skips merging
        the text tower, and ``row_heads`` (rows, classes, dim) gives each row's merged head (interpolated) instead of
        text passes."""
        features = self.encode_image(images, weights)
        if fixed_head is not None:
            scores = features @ fixed_head.T
        elif row_heads is not None:
            scores = torch.einsum("bd,bcd->bc", features, row_heads.to(features.dtype))
        else:
            unique, group = torch.unique(weights, dim=0, return_inverse=True)
            heads = self.zero_shot_heads(prompt_tokens, unique, num_classes)
            scores = torch.einsum("bd,bcd->bc", features, heads[group])
        return self.logit_scale(weights).unsqueeze(1) * scores

    @contextlib.contextmanager
    def _weights(self, weights: torch.Tensor) -> Iterator[None]:
        """During the block, the rows' weights are ``weights`` (rows × experts), with their ``columns`` and
        ``shaped_columns``; none after."""
        self.weights, self.columns = weights, with_complement(weights).T.contiguous()
        self.shaped_columns = {ndim: self._shape_columns(ndim) for ndim in range(1, 5)}
        try:
            yield
        finally:
            self.weights = self.columns = None
            self.shaped_columns = {}

    def _shape_columns(self, ndim: int) -> tuple[torch.Tensor, ...]:
        return self.columns.view(len(self.columns), -1, *([1] * (ndim - 1))).unbind()

    @contextlib.contextmanager
    def _rows(self, weights: torch.Tensor, runs: torch.Tensor | None) -> Iterator[dict[str, torch.Tensor]]:
        """During the block, the changed leaves run per row with ``weights`` (and ``runs``: see ``self.runs``), the
        changed parameters held outside leaves are per-row tensors, and the changed raw projections are taken out
        (yielded, by name, to be applied per row); everything is given back after."""
        self.runs = None if runs is None else with_complement(runs)
        saved: dict[str, torch.Tensor] = {}
        with self._weights(weights):
            try:
                for name, forward in self.forwards.items():
                    self.modules[name].forward = forward
                for name in self.per_row:
                    saved[name] = self._set(name, None)
                    self._set(name, self._per_row_value(name, saved[name]))
                for name in self.projections:
                    saved[name] = self._set(name, None)
                yield {name: saved[name] for name in self.projections}
            finally:
                for name in self.forwards:
                    self.modules[name].__dict__.pop("forward", None)
                for name, value in saved.items():
                    self._set(name, value)
                self.runs = None

    def _set(self, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
        """Put ``value`` in place of the parameter ``name`` (None: leave it, or take it out); returns what was there."""
        owner, _, attribute = name.rpartition(".")
        parameters = self.modules[owner]._parameters
        previous = parameters[attribute]
        if value is not None or name in self.projections:
            parameters[attribute] = value
        return previous

    # ----------------------------------------------------------------------------------------------- per row
    def _w(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Expert k's per-row weights, shaped to broadcast against ``like`` (rows first)."""
        return self._columns(like)[k]

    def _columns(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every expert's per-row weights, then 1 − Σ_k w_ik, shaped to broadcast against ``like`` (rows first)."""
        self._check_rows(like)
        columns = self.shaped_columns.get(like.ndim) or self._shape_columns(like.ndim)
        return columns if columns[0].dtype == like.dtype else tuple(c.to(like.dtype) for c in columns)

    def _check_rows(self, x: torch.Tensor) -> None:
        """A leaf's input has the batch's rows first, or the model's code mixes rows (the probe then says so)."""
        if len(x) != len(self.weights):
            raise RuntimeError(f"a leaf saw {len(x)} rows, not the batch's {len(self.weights)}")

    def _mix(self, base: torch.Tensor, values: list[torch.Tensor | None]) -> torch.Tensor:
        """base + Σ_k w_ik·(value_k − base) per row, skipping the experts that leave it as it is (None); one
        expert's by ``torch.lerp``, several as (1 − Σ_k w_ik)·base + Σ_k w_ik·value_k, accumulated in place (one pass
        per expert: six times quicker than a new tensor per term on a text pass's outputs). ``base`` has the batch's
        rows first (a parameter expanded to them)."""
        if self.count == 1:
            return base if values[0] is None else torch.lerp(base, values[0], self._w(0, base))
        columns = self._columns(base)
        changed = [(columns[k], value) for k, value in enumerate(values) if value is not None]
        if not changed:
            return base
        keep = columns[-1] if len(changed) == self.count else 1.0 - sum(w for w, _ in changed)
        mixed = base * keep
        for w, value in changed:
            mixed.addcmul_(w, value)
        return mixed

    def _batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input of one row the model broadcasts over the batch (BERT's position ids), as one row per sample."""
        return x.expand(len(self.weights), *x.shape[1:]) if len(x) == 1 else x

    def _per_row_value(self, name: str, pt: torch.Tensor) -> torch.Tensor:
        """A parameter per row, θ_pt + Σ_k w_ik·Δ_k, with a batch dimension in front where the model's code broadcasts
        (in place of a leading dimension of 1), and the class token's Δ folded in where it is (``FOLDED``)."""
        base = pt if pt.shape[0] == 1 else pt.unsqueeze(0)
        value = self._mix(
            base.expand(len(self.weights), *base.shape[1:]),
            [
                None if name not in d else d[name].view_as(base).expand(len(self.weights), *base.shape[1:])
                for d in self.dense
            ],
        ).clone()
        for token, target in FOLDED.items():
            if target == name:
                token_pt = self.modules[token.rpartition(".")[0]].get_parameter(token.rpartition(".")[2])
                for k, d in enumerate(self.dense):
                    if token in d:
                        value[:, 0] += self._w(k, value[:, 0]) * (d[token] - token_pt)
        return value

    def _values(self, name: str) -> list[torch.Tensor | None]:
        """Each expert's value of a leaf's parameter, None where it keeps the generalist's."""
        return [d.get(name) for d in self.dense]

    def _low_rank_terms(self, y: torch.Tensor, x: torch.Tensor, parameter: str) -> torch.Tensor:
        """y plus w_ik·s·(x·Aᵀ)·Bᵀ of every expert's update of ``parameter`` (on its rows of the output, if given):
        w_ik·s scales the rank-r activations, and the second product accumulates into y, so a term costs two thin
        products and nothing over the width of y."""
        for k, updates in enumerate(self.low_rank):
            for update in updates.get(parameter, ()):
                low = F.linear(x, update.down.to(x.dtype))
                low = low * (self._w(k, low) * update.scale)
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
        names, tokens = (prefix + weight_name, prefix + bias_name), x.shape[1:-1].numel()
        if self.row_weights.serves(names[0], tokens):
            self._check_rows(x)
            return self.row_weights.linear(x, names, (weight, bias), self.columns.T, self.runs)
        y = F.linear(x, weight, bias)
        outputs = []
        for d in self.dense:
            ft_weight, ft_bias = d.get(prefix + weight_name, weight), d.get(prefix + bias_name, bias)
            changed = ft_weight is not weight or ft_bias is not bias
            outputs.append(F.linear(x, ft_weight, ft_bias) if changed else None)
        return self._low_rank_terms(self._mix(y, outputs), x, prefix + weight_name)

    def _linear(self, name: str, module: nn.Linear) -> Callable:
        return lambda x: self._linear_rows(x, f"{name}.", module.weight, module.bias)

    def _layer_norm(self, name: str, module: nn.LayerNorm) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            normed = F.layer_norm(self._batch(x), module.normalized_shape, None, None, module.eps)
            rows = normed.shape[:1] + (1,) * (normed.ndim - 2) + module.weight.shape
            weight = self._mix(module.weight.expand(rows), self._values(f"{name}.weight"))
            if module.bias is None:
                return normed * weight
            return torch.addcmul(self._mix(module.bias.expand(rows), self._values(f"{name}.bias")), normed, weight)

        return forward

    def _layer_scale(self, name: str, module: nn.Module) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            x = self._batch(x)
            rows = x.shape[:1] + (1,) * (x.ndim - 2) + module.gamma.shape
            return x * self._mix(module.gamma.expand(rows), self._values(f"{name}.gamma"))

        return forward

    def _conv(self, name: str, module: nn.Conv2d) -> Callable:
        def per_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            """Each row through its own weight: one convolution with a group per row (and per group of the layer)."""
            rows = len(x)
            y = F.conv2d(
                x.reshape(1, -1, *x.shape[2:]),
                weight.reshape(-1, *weight.shape[2:]),
                None if bias is None else bias.reshape(-1),
                module.stride,
                module.padding,
                module.dilation,
                module.groups * rows,
            )
            return y.view(rows, -1, *y.shape[2:])

        def forward(x: torch.Tensor) -> torch.Tensor:
            x = self._batch(x)
            tokens = x.shape[2:].numel() // math.prod(module.stride) if module.padding_mode == "zeros" else 0
            names = (f"{name}.weight", f"{name}.bias")
            if self.row_weights.serves(names[0], tokens):
                self._check_rows(x)
                return self.row_weights(x, names, (module.weight, module.bias), self.columns.T, per_row)
            y = module._conv_forward(x, module.weight, module.bias)
            outputs = []
            for d in self.dense:
                expert = (d.get(f"{name}.weight", module.weight), d.get(f"{name}.bias", module.bias))
                changed = expert[0] is not module.weight or expert[1] is not module.bias
                outputs.append(module._conv_forward(x, *expert) if changed else None)
            return self._mix(y, outputs)

        return forward

    def _embedding(self, name: str, module: nn.Embedding) -> Callable:
        def lookup(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            options = (module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse)
            return F.embedding(ids, table, *options)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            ids = self._batch(ids)
            values = self._values(f"{name}.weight")
            return self._mix(lookup(ids, module.weight), [None if v is None else lookup(ids, v) for v in values])

        return forward

    def _attention(self, name: str, module: nn.MultiheadAttention) -> Callable:
        out_proj = module.out_proj

        def qkv(x: torch.Tensor) -> torch.Tensor:
            prefix, weight, bias = f"{name}.", module.in_proj_weight, module.in_proj_bias
            return self._linear_rows(x, prefix, weight, bias, "in_proj_weight", "in_proj_bias")

        def out(x: torch.Tensor) -> torch.Tensor:
            return self._linear_rows(x, f"{name}.out_proj.", out_proj.weight, out_proj.bias)

        def forward(query, key, value, need_weights=True, attn_mask=None, **flags):
            padded, causal = flags.get("key_padding_mask") is not None, flags.get("is_causal")
            if key is not query or value is not query or padded or causal:
                raise RuntimeError("only self-attention without key padding or causal flags runs per row")
            mask = attn_mask
            if mask is not None:  # nn.MultiheadAttention's boolean masks mark what may not attend, SDPA's what may
                mask = ~mask if mask.dtype == torch.bool else mask.to(query.dtype)
            return self_attention(query, qkv, out, module.num_heads, mask), None

        return forward
