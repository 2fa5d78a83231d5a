"""open_clip's own checkpoints: state_dict files (plain, training-style ``{'state_dict': {'module.…': …}}``,
safetensors), OpenAI's TorchScript archives, and open_clip pretrained tags already in the local cache."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.loading.architecture import Architecture
from tcube_lightning.loading.layouts import (
    MappedWeights,
    flat_keys,
    map_weights,
    read_checkpoint,
    refuse_pickled_module,
)
from tcube_lightning.loading.tensorfiles import LOAD_ERRORS, short_load_error


def load_weights_file(
    architecture: Architecture,
    path: Path,
    field: str = "checkpoint",
    key_prefix: str | None = None,
    generalist: nn.Module | None = None,
) -> tuple[nn.Module, MappedWeights]:
    """A state_dict file (or a schema's own weights) loaded strictly into the architecture, its keys mapped from the
    layout the file has (``layouts``: a nesting level, a key prefix, a prompt learner's towers; what a prompt learner's
    file lacks taken from ``generalist``). Returns the model and how the file was mapped (its learned context too)."""
    if not looks_like_a_checkpoint(path):
        raise not_a_checkpoint(field, path)
    model = architecture.create()
    checkpoint = read_checkpoint(path, field)
    state = model.state_dict()
    own = None if generalist is None else generalist.state_dict()
    mapped = map_weights(checkpoint, set(state), field, path, key_prefix, own)
    weights = {k: v.reshape(state[k].shape) if k == "logit_scale" else v for k, v in mapped.state_dict.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except LOAD_ERRORS as err:
        raise InputError(
            f"{field}: {path} could not be loaded into architecture {architecture.label!r}: {short_load_error(err)}"
        ) from err
    return model.eval().requires_grad_(False), mapped


def load_openai_archive(architecture: Architecture, path: Path) -> nn.Module:
    """OpenAI's TorchScript archive converted as open_clip's ``load_openai_model`` does (its state_dict, less the
    three metadata entries, into a QuickGELU CLIP, in float32), but into the architecture named."""
    check_activation(architecture, True, f"{path} (an OpenAI TorchScript archive)")
    try:
        with warnings.catch_warnings():  # OpenAI ships only this format: torch's deprecation note is not actionable
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError as err:
        raise InputError(f"checkpoint {path} is a zip archive but not a loadable TorchScript archive: {err}") from err
    for key in ("input_resolution", "context_length", "vocab_size"):
        state_dict.pop(key, None)
    model = architecture.create()
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise InputError(
            f"checkpoint {path} does not fit architecture {architecture.label!r}: {short_load_error(err)}"
        ) from err
    return model.eval().requires_grad_(False)


def load_tag(architecture: Architecture, tag: str) -> nn.Module:
    """An open_clip pretrained tag of a named architecture, from the local cache."""
    arch = architecture.name
    check_activation(
        architecture, open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False), f"pretrained tag {tag!r}"
    )
    try:
        model = open_clip.create_model(arch, pretrained=tag, cache_dir=architecture.cache_dir)
    except LOAD_ERRORS as err:
        raise InputError(
            f"open_clip pretrained tag {tag!r} of {arch!r} is not in the local cache "
            f'({architecture.cache_dir or "HF_HOME"}); on a machine with internet run `python -c "import open_clip; '
            f'open_clip.create_model({arch!r}, pretrained={tag!r})"` and copy its Hugging Face cache here, or give '
            f"the file: {err}"
        ) from err
    return model.eval().requires_grad_(False)


def is_pretrained_tag(architecture: Architecture, name: str) -> bool:
    return (
        not architecture.is_schema
        and architecture.name is not None
        and bool(open_clip.get_pretrained_cfg(architecture.name, name))
    )


def check_activation(architecture: Architecture, quick_gelu: bool, source: str) -> None:
    """Weights trained with QuickGELU give wrong outputs under GELU (and the reverse) without any error."""
    if architecture.quick_gelu == quick_gelu:
        return
    arch = architecture.label
    wanted, variant = ("QuickGELU", f"{arch}-quickgelu") if quick_gelu else ("GELU", arch.removesuffix("-quickgelu"))
    hint = f"use {variant!r}" if open_clip.get_model_config(variant) else f'set "quick_gelu": {str(quick_gelu).lower()}'
    raise InputError(f"{source} was trained with {wanted} but architecture {arch!r} does not use it: {hint}")


def looks_like_a_checkpoint(path: Path) -> bool:
    """By its first bytes: a torch zip archive (whole, or cut short), a (legacy) pickle, or safetensors (an 8-byte
    header length, then a JSON header)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    zipped = zipfile.is_zipfile(path) or head[:4] == b"PK\x03\x04"  # a zip archive, or one cut short
    return zipped or head[:1] == b"\x80" or (len(head) == 9 and head[8:9] == b"{")


def not_a_checkpoint(field: str, path: Path) -> InputError:
    return InputError(
        f"{field}: {path} is not a checkpoint file: neither a torch zip archive, a pickle nor safetensors "
        "(expected an open_clip state_dict, a training checkpoint, safetensors or OpenAI's TorchScript file)"
    )


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released CLIP weights are TorchScript archives: zip files with a ``constants.pkl`` record."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def checkpoint_keys(path: Path, field: str = "checkpoint") -> list[str]:
    """The tensor names of a state_dict file, read cheaply (safetensors' header, a memory-mapped torch archive); an
    empty list for what is no readable state_dict (the loader then says why); a whole pickled module is refused here,
    before anything loads."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (*LOAD_ERRORS, SafetensorError) as err:
        refuse_pickled_module(err, field, path)
        return []
    return list(flat_keys(checkpoint)) if isinstance(checkpoint, dict) else []
