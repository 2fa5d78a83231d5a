"""Building the two open_clip models and their zero-shot heads."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
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


def checkpoint_kind(arch: str, checkpoint: str | Path, field: str = "checkpoint") -> str:
    """``"file"`` or ``"tag"`` (an open_clip pretrained tag of ``arch``), checked without loading anything."""
    if Path(checkpoint).is_file():
        return "file"
    if open_clip.get_pretrained_cfg(arch, str(checkpoint)):
        return "tag"
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise InputError(
        f"{field}: file not found: {checkpoint} (expected an open_clip state_dict, safetensors or OpenAI "
        f"TorchScript file, or a pretrained tag of {arch!r}: {tags or 'it has none'})"
    )


def expected_normalization(arch: str, checkpoint: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the weights were trained with: the pretrained tag's, else the architecture config's
    ``preprocess_cfg``, else open_clip's default (OpenAI CLIP's). Known without loading any weights."""
    config = open_clip.get_model_config(arch).get("preprocess_cfg", {})
    if checkpoint_kind(arch, checkpoint) == "tag":
        config = {**config, **open_clip.get_pretrained_cfg(arch, str(checkpoint))}
    mean, std = config.get("mean", OPENAI_DATASET_MEAN), config.get("std", OPENAI_DATASET_STD)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def check_preprocessing(
    arch: str, checkpoint: str | Path, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """Before any weights load: the data's image size and normalisation are those the generalist expects."""
    model_size = architecture_image_size(arch)
    if image_size != model_size:
        raise InputError(f"data.image_size is {image_size} but {arch} expects {model_size}-pixel images")
    expected_mean, expected_std = expected_normalization(arch, checkpoint)
    close = all(abs(a - b) <= 1e-6 for a, b in zip((*mean, *std), (*expected_mean, *expected_std)))
    if not close:
        raise InputError(
            f"data.mean/data.std are {list(mean)}/{list(std)} but {checkpoint} was trained with mean "
            f"{list(expected_mean)} and std {list(expected_std)}: give --data.mean '{list(expected_mean)}' "
            f"--data.std '{list(expected_std)}'"
        )


def load_clip(arch: str, checkpoint: str | Path, cache_dir: str | None = None) -> nn.Module:
    """An open_clip CLIP of architecture ``arch`` in eval mode, with weights from ``checkpoint``: a local file
    (open_clip or training-style state_dict, safetensors, OpenAI's TorchScript archive) or an open_clip
    pretrained tag already in the local cache (``cache_dir``, default Hugging Face's)."""
    check_architecture(arch)
    path = Path(checkpoint)
    if checkpoint_kind(arch, checkpoint) == "file":
        if is_torchscript_archive(path):
            return _load_openai_archive(arch, path)
        return _create(arch, str(path), f"checkpoint {path} could not be loaded into open_clip architecture {arch!r}")
    tag = str(checkpoint)
    _check_activation(arch, open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False), f"pretrained tag {tag!r}")
    return _create(
        arch,
        tag,
        f"open_clip pretrained tag {tag!r} of {arch!r} is not in the local cache ({cache_dir or 'HF_HOME'}); "
        f'on a machine with internet run `python -c "import open_clip; open_clip.create_model({arch!r}, '
        f'pretrained={tag!r})"` and copy its Hugging Face cache here, or give the file',
        cache_dir,
    )


def looks_like_a_checkpoint(path: Path) -> bool:
    """By its first bytes: a torch zip archive, a (legacy) pickle, or safetensors (an 8-byte header length, then
    a JSON header)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80" or (len(head) == 9 and head[8:9] == b"{")


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released CLIP weights are TorchScript archives: zip files with a ``constants.pkl`` record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def _load_openai_archive(arch: str, path: Path) -> nn.Module:
    """OpenAI's TorchScript archive converted as open_clip's ``load_openai_model`` does (its state_dict, less
    the three metadata entries, into a QuickGELU CLIP, in float32), but into the architecture named ``arch``."""
    _check_activation(arch, True, f"{path} (an OpenAI TorchScript archive)")
    try:
        with warnings.catch_warnings():  # OpenAI ships only this format: torch's deprecation note is not actionable
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError as err:
        raise InputError(f"checkpoint {path} is a zip archive but not a loadable TorchScript archive: {err}") from err
    for key in ("input_resolution", "context_length", "vocab_size"):
        state_dict.pop(key, None)
    model = open_clip.create_model(arch)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise InputError(f"checkpoint {path} does not fit open_clip architecture {arch!r}: {err}") from err
    return model.eval().requires_grad_(False)


def _check_activation(arch: str, quick_gelu: bool, source: str) -> None:
    """Weights trained with QuickGELU give wrong outputs under GELU (and the reverse) without any error."""
    if bool(open_clip.get_model_config(arch).get("quick_gelu", False)) == quick_gelu:
        return
    wanted, variant = ("QuickGELU", f"{arch}-quickgelu") if quick_gelu else ("GELU", arch.removesuffix("-quickgelu"))
    hint = f"use {variant!r}" if open_clip.get_model_config(variant) else f'set "quick_gelu": {str(quick_gelu).lower()}'
    raise InputError(f"{source} was trained with {wanted} but architecture {arch!r} does not use it: {hint}")


def _create(arch: str, pretrained: str, failure: str, cache_dir: str | None = None) -> nn.Module:
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir)
    except (RuntimeError, KeyError, ValueError, EOFError, OSError, AssertionError, pickle.UnpicklingError) as err:
        path = Path(pretrained)
        if path.is_file() and not looks_like_a_checkpoint(path):
            raise InputError(
                f"checkpoint {path} is not a checkpoint file: neither a torch zip archive, a pickle nor safetensors "
                "(expected an open_clip state_dict, a training checkpoint, safetensors or OpenAI's TorchScript file)"
            ) from err
        raise InputError(f"{failure}: {err}") from err
    return model.eval().requires_grad_(False)


def tokenize_prompts(arch: str, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """Token ids of every (class, template) prompt, class-major: shape (classes × templates, context). The
    templates were checked by the data module (each has one ``{}``)."""
    if not classnames:
        raise InputError("classnames: at least one class name is needed to build a zero-shot head")
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
