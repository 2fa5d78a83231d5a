"""Building the two open_clip models and their zero-shot heads."""

from __future__ import annotations

import pickle
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from tcube_lightning.errors import InputError

BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(BUNDLED_CONFIGS)


def register_model_config(path: str | Path) -> None:
    """Make a user's open_clip model config (a JSON file, or a folder of them) known by its file name."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model_config: no such file or folder: {path} (expected an open_clip JSON config)")
    open_clip.add_model_config(path)


def check_architecture(arch: str) -> None:
    """Fail early, listing close names, when open_clip does not know ``arch``."""
    if open_clip.get_model_config(arch) is None:
        known = open_clip.list_models()
        close = [m for m in known if arch.lower().split("-")[0] in m.lower()][:8]
        raise InputError(
            f"arch: open_clip has no model config named {arch!r}. Similar names: {close or known[:8]}. "
            "Give a custom architecture's JSON with model_config."
        )


def architecture_image_size(arch: str) -> int:
    """The image side an open_clip architecture expects, from its config (no weights loaded)."""
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return size[0] if isinstance(size, (tuple, list)) else size


def load_clip(arch: str, checkpoint: str | Path) -> nn.Module:
    """An open_clip CLIP of architecture ``arch`` with weights from a local checkpoint file, in eval mode."""
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path} (expected an open_clip state_dict file for {arch!r})")
    check_architecture(arch)
    try:
        model = open_clip.create_model(arch, pretrained=str(path))
    except (RuntimeError, KeyError, ValueError, EOFError, OSError, AssertionError, pickle.UnpicklingError) as err:
        raise InputError(f"checkpoint {path} could not be loaded into open_clip architecture {arch!r}: {err}") from err
    return model.eval().requires_grad_(False)


def tokenize_prompts(arch: str, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, class-major: shape (classes × templates, context)."""
    if not classnames:
        raise InputError("classnames: at least one class name is needed to build a zero-shot head")
    if not templates or any("{}" not in t for t in templates):
        raise InputError(f"templates: each prompt template needs one '{{}}' for the class name, got {templates!r}")
    tokenizer = open_clip.get_tokenizer(arch)
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
