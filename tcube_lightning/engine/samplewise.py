"""Exact sample-wise merging in one batched pass, for open_clip's standard ViT CLIP.

Every parameterised map in a CLIP ViT is affine in its own parameters once its input is fixed:
``f(x; (1−w)·θ_pt + w·θ_ft) = (1−w)·f(x; θ_pt) + w·f(x; θ_ft)`` for linear layers, the patch
convolution, LayerNorm's affine part and LayerScale, and embeddings and projections are merged per row.
Attention is not affine in its parameters, so it is split into its q/k/v/out projections, each merged
this way, with softmax on the resulting activations. Each row of a batch thus runs through its own
merged network, exactly, with two products per layer instead of one, no per-sample loop and no merged
copies of the weights. Architectures outside this pattern fall back to ``per_sample_loop``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import LayerScale, ResidualAttentionBlock, VisionTransformer
from torch import nn


def per_sample_loop(
    merged_logits: Callable[[torch.Tensor, float], torch.Tensor], images: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Each sample through the model merged with its own weight; samples sharing a weight share a merge."""
    unique, group = torch.unique(weights, return_inverse=True)
    logits = None
    for k, weight in enumerate(unique.tolist()):
        index = (group == k).nonzero().squeeze(1)
        part = merged_logits(images[index], weight)
        if logits is None:
            logits = part.new_empty(len(images), part.shape[1])
        logits[index] = part
    return logits


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the vectorized path cannot run ``model`` exactly, or None when it can."""
    if type(model) is not CLIP:
        return f"{type(model).__name__} is not open_clip's standard CLIP class"
    visual = model.visual
    if type(visual) is not VisionTransformer:
        return f"the image tower is a {type(visual).__name__}, not a VisionTransformer"
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        return "the image tower uses attentional or unusual pooling"
    if not isinstance(visual.patch_dropout, nn.Identity) and visual.patch_dropout.prob > 0:
        return "the image tower uses patch dropout"
    if model.text_pool_type != "argmax" or isinstance(model.text_projection, nn.Linear):
        return "the text tower uses a pooling or projection other than open_clip's CLIP default"
    if getattr(model, "logit_bias", None) is not None:
        return "the model has a logit bias (SigLIP)"
    for tower in (visual.transformer, model.transformer):
        if not tower.batch_first:
            return "a transformer is not batch-first"
        for block in tower.resblocks:
            if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
                return f"a transformer block is a {type(block).__name__}"
            attn = block.attn
            if attn.bias_k is not None or not attn._qkv_same_embed_dim or not attn.batch_first:
                return "an attention layer has separate q/k/v weights or bias_k/bias_v"
            for ls in (block.ls_1, block.ls_2):
                if not isinstance(ls, (nn.Identity, LayerScale)):
                    return f"a block uses {type(ls).__name__} for layer scale"
    return None


def row_weights(weights: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-row weights shaped to broadcast against a tensor of ``ndim`` dimensions."""
    return weights.view(-1, *([1] * (ndim - 1)))


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


class PerSamplePass:
    """A CLIP run on a batch whose row i has its own merged weights θ_i = θ_pt + w_i·(θ_ft − θ_pt), exactly, in one
    pass. Subclasses give the towers; the zero-shot heads and logits are composed here."""

    def encode_image(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logit_scale(self, weights: torch.Tensor) -> torch.Tensor:
        """exp of the per-row merged logit scale (it enters through exp, so it is merged before)."""
        pt, ft = self.scales
        return torch.lerp(pt, ft, weights.to(pt.dtype)).exp()

    def zero_shot_heads(
        self, prompt_tokens: torch.Tensor, weights: torch.Tensor, num_classes: int, chunk: int = 4096
    ) -> torch.Tensor:
        """Heads (len(weights), classes, dim): every prompt through the text tower merged at each weight."""
        prompts = len(prompt_tokens)
        tokens = prompt_tokens.repeat(len(weights), 1)
        rows = weights.repeat_interleave(prompts)
        text = torch.cat(
            [self.encode_text(tokens[i : i + chunk], rows[i : i + chunk]) for i in range(0, len(tokens), chunk)]
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
        """Zero-shot logits with per-sample merged towers; ``fixed_head`` skips merging the text tower, and
        ``row_heads`` (rows, classes, dim) gives each row's merged head (interpolated) instead of text passes."""
        features = self.encode_image(images, weights)
        if fixed_head is not None:
            scores = features @ fixed_head.T
        elif row_heads is not None:
            scores = torch.einsum("bd,bcd->bc", features, row_heads.to(features.dtype))
        else:
            unique, group = torch.unique(weights, return_inverse=True)
            heads = self.zero_shot_heads(prompt_tokens, unique, num_classes)
            scores = torch.einsum("bd,bcd->bc", features, heads[group])
        return self.logit_scale(weights).unsqueeze(1) * scores


class SampleWiseCLIP(PerSamplePass):
    """An open_clip CLIP whose every row of input runs with its own θ = (1−w_i)·θ_pt + w_i·θ_ft: open_clip's own
    towers, whose raw projections and class embedding need code of their own (see ``leafwise`` for the rest)."""

    def __init__(self, pretrained: CLIP, expert: CLIP) -> None:
        reason = unsupported_reason(pretrained)
        if reason is not None:
            raise NotImplementedError(reason)
        self.pt, self.ft = pretrained, expert
        self.scales = (pretrained.logit_scale, expert.logit_scale)

    # ------------------------------------------------------------- primitives
    @staticmethod
    def _mix(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Per-row merged parameter: shape (rows, *a.shape)."""
        return torch.lerp(a, b, row_weights(w, a.ndim + 1).to(a.dtype))

    def _affine(self, y_pt: torch.Tensor, y_ft: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.lerp(y_pt, y_ft, row_weights(w, y_pt.ndim).to(y_pt.dtype))

    def _linear(
        self, x: torch.Tensor, pt: nn.Module, ft: nn.Module, w: torch.Tensor, weight: str = "weight"
    ) -> torch.Tensor:
        y = self._affine(F.linear(x, getattr(pt, weight)), F.linear(x, getattr(ft, weight)), w)
        bias = "bias" if weight == "weight" else weight.replace("weight", "bias")
        if getattr(pt, bias, None) is not None:
            y = y + self._mix(getattr(pt, bias), getattr(ft, bias), w).unsqueeze(1)
        return y

    def _layer_norm(self, x: torch.Tensor, pt: nn.LayerNorm, ft: nn.LayerNorm, w: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, pt.normalized_shape, None, None, pt.eps)
        return normed * self._mix(pt.weight, ft.weight, w).unsqueeze(1) + self._mix(pt.bias, ft.bias, w).unsqueeze(1)

    def _project(self, x: torch.Tensor, pt: torch.Tensor, ft: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._affine(x @ pt, x @ ft, w)

    def _layer_scale(self, x: torch.Tensor, pt: nn.Module, ft: nn.Module, w: torch.Tensor) -> torch.Tensor:
        if isinstance(pt, nn.Identity):
            return x
        return x * self._mix(pt.gamma, ft.gamma, w).unsqueeze(1)

    def _attention(
        self, x: torch.Tensor, pt: nn.MultiheadAttention, ft: nn.MultiheadAttention, w: torch.Tensor, mask
    ) -> torch.Tensor:
        qkv = partial(self._linear, pt=pt, ft=ft, w=w, weight="in_proj_weight")
        return self_attention(x, qkv, partial(self._linear, pt=pt.out_proj, ft=ft.out_proj, w=w), pt.num_heads, mask)

    def _transformer(self, x: torch.Tensor, pt: nn.Module, ft: nn.Module, w: torch.Tensor, mask=None) -> torch.Tensor:
        for block_pt, block_ft in zip(pt.resblocks, ft.resblocks):
            attn = self._attention(
                self._layer_norm(x, block_pt.ln_1, block_ft.ln_1, w), block_pt.attn, block_ft.attn, w, mask
            )
            x = x + self._layer_scale(attn, block_pt.ls_1, block_ft.ls_1, w)
            h = self._linear(
                self._layer_norm(x, block_pt.ln_2, block_ft.ln_2, w), block_pt.mlp.c_fc, block_ft.mlp.c_fc, w
            )
            h = self._linear(block_pt.mlp.gelu(h), block_pt.mlp.c_proj, block_ft.mlp.c_proj, w)
            x = x + self._layer_scale(h, block_pt.ls_2, block_ft.ls_2, w)
        return x

    # ----------------------------------------------------------------- towers
    def encode_image(self, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings; row i uses expert weight ``weights[i]``."""
        vp, vf = self.pt.visual, self.ft.visual
        x = self._affine(
            F.conv2d(images, vp.conv1.weight, stride=vp.conv1.stride),
            F.conv2d(images, vf.conv1.weight, stride=vf.conv1.stride),
            weights,
        )
        x = x.flatten(2).transpose(1, 2)
        cls = self._mix(vp.class_embedding, vf.class_embedding, weights).unsqueeze(1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self._mix(vp.positional_embedding, vf.positional_embedding, weights).to(
            x.dtype
        )
        x = self._layer_norm(x, vp.ln_pre, vf.ln_pre, weights)
        x = self._transformer(x, vp.transformer, vf.transformer, weights)
        if vp.final_ln_after_pool:
            pooled = vp._global_pool(x)[0]
            pooled = self._layer_norm(pooled.unsqueeze(1), vp.ln_post, vf.ln_post, weights).squeeze(1)
        else:
            pooled = vp._global_pool(self._layer_norm(x, vp.ln_post, vf.ln_post, weights))[0]
        if vp.proj is not None:
            pooled = self._project(pooled, vp.proj, vf.proj, weights)
        return F.normalize(pooled, dim=-1)

    def encode_text(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings; row i uses expert weight ``weights[i]``."""
        pt, ft = self.pt, self.ft
        x = self._affine(
            F.embedding(tokens, pt.token_embedding.weight), F.embedding(tokens, ft.token_embedding.weight), weights
        )
        x = x + self._mix(pt.positional_embedding, ft.positional_embedding, weights)
        mask = pt.attn_mask.to(x.dtype) if pt.attn_mask is not None else None
        x = self._transformer(x, pt.transformer, ft.transformer, weights, mask)
        x = self._layer_norm(x, pt.ln_final, ft.ln_final, weights)
        x = x[torch.arange(len(x), device=x.device), tokens.argmax(dim=-1)]
        return F.normalize(self._project(x, pt.text_projection, ft.text_projection, weights), dim=-1)
