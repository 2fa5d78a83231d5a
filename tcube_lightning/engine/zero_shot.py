"""Prompts and zero-shot heads of a loaded CLIP (loading itself is in ``loading``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tcube_lightning.errors import InputError


def tokenize_prompts(
    tokenizer: Callable[[list[str]], torch.Tensor], classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """Token ids of every (class, template) prompt, class-major: shape (classes × templates, context). The
    templates were checked by the data module (each has one ``{}``)."""
    if not classnames:
        raise InputError("classnames: at least one class name is needed to build a zero-shot head")
    return tokenizer([t.format(c) for c in classnames for t in templates])


def zero_shot_head(model: nn.Module, prompt_tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class embeddings (classes, dim): the normalised mean of each class's normalised prompt embeddings."""
    text = model.encode_text(prompt_tokens, normalize=True)
    text = text.reshape(num_classes, -1, text.shape[-1]).mean(dim=1)
    return F.normalize(text, dim=-1)


def clip_logits(model: nn.Module, images: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits: logit_scale · cos(image embedding, class embedding)."""
    features = model.encode_image(images, normalize=True)
    return model.logit_scale.exp() * features @ head.T
