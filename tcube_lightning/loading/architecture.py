"""Which network both models are: an open_clip architecture name, a schema name (``hf-hub:org/repo`` read from the
local Hugging Face cache, ``local-dir:DIR``), or a transformers CLIPModel folder's own config.

A schema's files are found here, before any weights load, so that a missing file is named up front. Its model is
always created empty (no weights: open_clip would otherwise ignore a checkpoint given beside a schema name, or fall
back to random weights when the schema's own are missing) and every weights file is then loaded into it strictly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.quiet import creating_empty_models

BUNDLED_CONFIGS = Path(__file__).parents[1] / "model_configs"
open_clip.add_model_config(BUNDLED_CONFIGS)

SCHEMAS = ("hf-hub:", "local-dir:")
SCHEMA_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
"""A schema's own weights files, in open_clip's order of preference."""
SCHEMA_CONFIG = "open_clip_config.json"


@dataclass(frozen=True)
class Architecture:
    """Both models' network, known without loading any weights.

    Args:
        name: As given in ``model.arch``; None when it comes from a transformers CLIPModel folder.
        model_cfg: open_clip's model config.
        preprocess_cfg: The normalisation (``mean``, ``std``) the architecture's config declares, if any.
        cache_dir: Where Hugging Face files (hf-hub schemas, text towers, tokenizers) are looked up.
        own_weights: A schema's own weights file, if it has one.
        text_tower: The local folder of a Hugging Face text tower's config.json (schemas with an HF text tower).
        source: What ``name`` is, in words, for messages and results.
    """

    name: str | None
    model_cfg: dict
    preprocess_cfg: dict = field(default_factory=dict)
    cache_dir: str | None = None
    own_weights: str | None = None
    text_tower: str | None = None
    source: str = "open_clip architecture"

    @property
    def label(self) -> str:
        return self.name or self.source

    @property
    def is_schema(self) -> bool:
        return self.name is not None and self.name.startswith(SCHEMAS)

    @property
    def image_size(self) -> int:
        return image_side(self.model_cfg["vision_cfg"].get("image_size", 224))

    @property
    def quick_gelu(self) -> bool:
        return bool(self.model_cfg.get("quick_gelu", False))

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) the architecture's config declares, else OpenAI CLIP's (open_clip's default)."""
        mean = self.preprocess_cfg.get("mean", OPENAI_DATASET_MEAN)
        std = self.preprocess_cfg.get("std", OPENAI_DATASET_STD)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def create(self) -> nn.Module:
        """The model with freshly initialised weights (none loaded, none downloaded), in eval mode."""
        return self._build("cpu")

    def skeleton(self) -> nn.Module:
        """The model's parameter names and shapes without their memory (meta tensors): what an adapter is checked
        against before any weights load."""
        with torch.device("meta"):
            return self._build("meta")

    def _build(self, device: str) -> nn.Module:
        if self.name is None:
            return open_clip.CLIP(**self.model_cfg).eval().requires_grad_(False)
        overrides = {}
        if self.text_tower is not None:  # read from the folder found up front (cache_dir honoured)
            text_cfg = {**self.model_cfg["text_cfg"], "hf_model_name": self.text_tower, "hf_model_pretrained": False}
            overrides["text_cfg"] = text_cfg
        with creating_empty_models():
            model = open_clip.create_model(
                self.name,
                load_weights=False,
                pretrained_image=False,
                pretrained_text=False,
                cache_dir=self.cache_dir,
                device=device,
                **overrides,
            )
        return model.eval().requires_grad_(False)

    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        return tokenizer_of(self.name, self.cache_dir, self.model_cfg["text_cfg"].get("context_length", 77))


@functools.cache
def tokenizer_of(name: str | None, cache_dir: str | None, context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """A tokenizer, built once per process (open_clip reads its BPE vocabulary anew each time, a quarter second):
    a tokenizer keeps no state between calls, so every run in the process can share it."""
    if name is None:  # a transformers CLIP: OpenAI's BPE vocabulary (checked when the config was read)
        return open_clip.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(name, cache_dir=cache_dir)


def image_side(size: int | tuple[int, ...] | list[int]) -> int:
    """An open_clip image size (an int, or the sides of a square) as the one side."""
    return size[0] if isinstance(size, (tuple, list)) else size


def register_model_config(path: str | Path) -> None:
    """Make a user's open_clip model config (a JSON file, or a folder of them) known by its file name."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model_config: no such file or folder: {path} (expected an open_clip JSON config)")
    open_clip.add_model_config(path)


def named_architecture(arch: str) -> Architecture:
    """An architecture open_clip knows by name (built in, bundled, or registered with ``model_config``)."""
    config = open_clip.get_model_config(arch)
    if config is None:
        known = open_clip.list_models()
        close = [m for m in known if arch.lower().split("-")[0] in m.lower()][:8]
        raise InputError(
            f"arch: open_clip has no model config named {arch!r}. Similar names: {close or known[:8]}. Give a custom "
            "architecture's JSON with model_config, or a schema name: hf-hub:org/repo (from the local Hugging Face "
            "cache) or local-dir:DIR (a folder with open_clip_config.json)"
        )
    return Architecture(arch, config, config.get("preprocess_cfg", {}))


def schema_architecture(arch: str, cache_dir: str | None = None) -> Architecture:
    """``hf-hub:org/repo`` (from the local Hugging Face cache) or ``local-dir:DIR``: its open_clip_config.json, its
    own weights file if any, and its Hugging Face text tower's config, all found before anything loads."""
    schema, identifier = arch.split(":", 1)
    if not identifier:
        raise InputError(f"arch: {arch!r} names no {'repository' if schema == 'hf-hub' else 'folder'}")
    if schema == "local-dir":
        folder = Path(identifier)
        if not (folder / SCHEMA_CONFIG).is_file():
            raise InputError(
                f"arch: {arch}: {folder / SCHEMA_CONFIG} not found (a local-dir: folder holds open_clip_config.json "
                f"and, for its own weights, one of {list(SCHEMA_WEIGHTS)})"
            )
        config_file = folder / SCHEMA_CONFIG
        weights = next((str(folder / n) for n in SCHEMA_WEIGHTS if (folder / n).is_file()), None)
        source = f"open_clip folder {folder}"
    else:
        config_file = Path(_cached_hub_file(identifier, SCHEMA_CONFIG, cache_dir, "arch"))
        weights = next((p for n in SCHEMA_WEIGHTS if (p := _hub_file_or_none(identifier, n, cache_dir))), None)
        source = f"Hugging Face repository {identifier}"
    try:
        config = json.loads(config_file.read_text())
        model_cfg = config["model_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"arch: {config_file} is not an open_clip config with a 'model_cfg' ({err})") from err
    text_tower = _text_tower_folder(model_cfg.get("text_cfg", {}), cache_dir)
    return Architecture(arch, model_cfg, config.get("preprocess_cfg", {}), cache_dir, weights, text_tower, source)


def _text_tower_folder(text_cfg: dict, cache_dir: str | None) -> str | None:
    """The local folder holding a Hugging Face text tower's config.json (a path as given, or the cached snapshot of
    a Hub repository), so that the tower is built from it whatever ``cache_dir`` is."""
    name = text_cfg.get("hf_model_name")
    if not name:
        return None
    if Path(name).is_dir():
        return name
    return str(Path(_cached_hub_file(name, "config.json", cache_dir, "arch (its text tower)")).parent)


def _hub_file_or_none(repo: str, filename: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    return path if isinstance(path, str) else None


def _cached_hub_file(repo: str, filename: str, cache_dir: str | None, field_name: str) -> str:
    """A file of a Hub repository from the local cache; never downloads."""
    path = _hub_file_or_none(repo, filename, cache_dir)
    if path is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise InputError(
            f"{field_name}: {filename} of the Hugging Face repository {repo} is not in the local cache "
            f"({cache_dir or HF_HUB_CACHE}). On a machine with internet, download the repository once (e.g. "
            f"`huggingface-cli download {repo}`) and copy the cache here, or point model.cache_dir at it"
        )
    return path
