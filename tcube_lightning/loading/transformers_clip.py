"""transformers ``CLIPModel`` folders (PubMedCLIP and other Hub CLIPs: config.json + model.safetensors or
pytorch_model.bin) as the equivalent open_clip CLIP: the config mapped field by field, the weights key by key, so
that every path of the engine (the vectorized one included) runs on them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from tcube_lightning.errors import InputError
from tcube_lightning.loading.tensorfiles import read_tensors

OPENAI_BPE_VOCAB = 49408
"""open_clip's tokenizer for converted models is OpenAI's BPE: its vocabulary has this many entries."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
LAYER_KEYS = {  # transformers name → open_clip name, inside each encoder layer / residual block
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
TOWER_KEYS = {  # everything outside the layers; projections are transposed (nn.Linear weight vs x @ proj)
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED_KEYS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
IGNORED_SUFFIXES = ("position_ids",)
"""Buffers older transformers versions saved; open_clip computes them."""


def is_transformers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_config(folder: Path, field: str) -> dict:
    """config.json of a full CLIPModel; a vision- or text-only checkpoint (or another model type) is refused."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{field}: {folder / 'config.json'} is not valid JSON: {err}") from err
    model_type = config.get("model_type")
    if model_type in ("clip_vision_model", "clip_text_model"):
        tower = "vision" if model_type == "clip_vision_model" else "text"
        raise InputError(
            f"{field}: {folder} is a {tower}-only transformers checkpoint ({model_type}, "
            f"{config.get('architectures')}); T³ needs the whole CLIPModel (both towers: zero-shot heads come from "
            "the text tower)"
        )
    if model_type != "clip":
        raise InputError(
            f"{field}: {folder}/config.json has model_type {model_type!r}; a transformers checkpoint must be a "
            "CLIPModel (model_type 'clip')"
        )
    return config


def open_clip_config(config: dict, field: str) -> dict:
    """The open_clip model config equivalent to a transformers CLIPConfig, or a clear error where none is."""
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    activations = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(activations) != 1 or not activations <= {"quick_gelu", "gelu"}:
        raise InputError(
            f"{field}: hidden_act {sorted(activations)}: open_clip's CLIP has one activation for both towers, "
            "quick_gelu or gelu"
        )
    for tower_name, tower in (("vision_config", vision), ("text_config", text)):
        if tower.get("layer_norm_eps", 1e-5) != 1e-5:
            raise InputError(f"{field}: {tower_name}.layer_norm_eps is {tower['layer_norm_eps']}; open_clip uses 1e-5")
    if text.get("vocab_size", OPENAI_BPE_VOCAB) != OPENAI_BPE_VOCAB:
        raise InputError(
            f"{field}: text_config.vocab_size is {text['vocab_size']}, not OpenAI's BPE vocabulary "
            f"({OPENAI_BPE_VOCAB} entries), which open_clip's tokenizer uses"
        )
    if text.get("eos_token_id", 2) not in (2, OPENAI_BPE_VOCAB - 1):
        raise InputError(
            f"{field}: text_config.eos_token_id {text['eos_token_id']}: the text is pooled at OpenAI's "
            "end-of-text token (open_clip's argmax pooling)"
        )

    def sizes(tower: dict, default_width: int, default_heads: int, default_layers: int, default_mlp: int) -> dict:
        width = tower.get("hidden_size", default_width)
        heads = tower.get("num_attention_heads", default_heads)
        return {
            "width": width,
            "layers": tower.get("num_hidden_layers", default_layers),
            "heads": heads,
            "mlp_ratio": tower.get("intermediate_size", default_mlp) / width,
        }

    v, t = sizes(vision, 768, 12, 12, 3072), sizes(text, 512, 8, 12, 2048)
    vision_cfg = {
        "image_size": vision.get("image_size", 224),
        "patch_size": vision.get("patch_size", 32),
        "width": v["width"],
        "layers": v["layers"],
        "head_width": v["width"] // v["heads"],
        "mlp_ratio": v["mlp_ratio"],
    }
    text_cfg = {
        "context_length": text.get("max_position_embeddings", 77),
        "vocab_size": OPENAI_BPE_VOCAB,
        "width": t["width"],
        "heads": t["heads"],
        "layers": t["layers"],
        "mlp_ratio": t["mlp_ratio"],
    }
    return {
        "embed_dim": config.get("projection_dim", 512),
        "quick_gelu": activations == {"quick_gelu"},
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }


def config_differences(model_cfg: dict, converted: dict) -> list[str]:
    """Where an architecture's open_clip config differs from a converted checkpoint's, every field with its default
    filled in (shapes alone would not show a different head count or activation): "field: ours vs checkpoint's"."""
    differences = []
    if model_cfg.get("embed_dim") != converted["embed_dim"]:
        differences.append(f"embed_dim: {model_cfg.get('embed_dim')} vs {converted['embed_dim']}")
    if bool(model_cfg.get("quick_gelu", False)) != converted["quick_gelu"]:
        differences.append(f"quick_gelu: {bool(model_cfg.get('quick_gelu', False))} vs {converted['quick_gelu']}")
    for key, cls in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        ours, theirs = (dataclasses.asdict(cls(**cfg.get(key, {}))) for cfg in (model_cfg, converted))
        differences += [f"{key}.{name}: {ours[name]} vs {theirs[name]}" for name in ours if ours[name] != theirs[name]]
    return differences


def normalization(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The image mean and std of the folder's preprocessor_config.json, if it has one."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if "image_mean" not in config or "image_std" not in config:
        return None
    return tuple(float(v) for v in config["image_mean"]), tuple(float(v) for v in config["image_std"])


def weights_file(folder: Path, field: str) -> Path:
    found = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        present = sorted(p.name for p in folder.iterdir())
        raise InputError(
            f"{field}: {folder} holds no CLIPModel weights: expected one of {list(WEIGHT_FILES)}, found {present}"
        )
    return found


def read_state_dict(folder: Path, field: str) -> dict[str, torch.Tensor]:
    """The CLIPModel's tensors: one safetensors file, safetensors shards listed by their index, or a torch file."""
    path = weights_file(folder, field)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_tensors(folder / shard, field).items()}
    return read_tensors(path, field)


def convert_state_dict(state: dict[str, torch.Tensor], model_cfg: dict, field: str) -> dict[str, torch.Tensor]:
    """open_clip's state_dict of the same network: q/k/v projections concatenated into ``in_proj``, projections
    transposed, every other tensor renamed. A tensor left over is an error, not dropped."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    converted, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise InputError(f"{field}: the CLIPModel weights lack {key}")
        used.add(key)
        return state[key]

    for source, target in TOWER_KEYS.items():
        value = take(source)
        converted[target] = value.reshape(()) if target == "logit_scale" else value
    for source, target in TRANSPOSED_KEYS.items():
        converted[target] = take(source).T.contiguous()
    for tower, prefix, layers in (
        ("vision_model", "visual.", model_cfg["vision_cfg"]["layers"]),
        ("text_model", "", model_cfg["text_cfg"]["layers"]),
    ):
        for i in range(layers):
            source, target = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                q, k, v = (take(f"{source}self_attn.{p}_proj.{kind}") for p in "qkv")
                converted[f"{target}attn.in_proj_{kind}"] = torch.cat([q, k, v])
                for hf_name, oc_name in LAYER_KEYS.items():
                    converted[f"{target}{oc_name}.{kind}"] = take(f"{source}{hf_name}.{kind}")
    left = sorted(set(state) - used)
    if left:
        raise InputError(f"{field}: CLIPModel tensors with no open_clip counterpart: {left[:8]}")
    return converted
