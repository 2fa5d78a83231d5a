"""transformers ``CLIPModel`` folders (PubMedCLIP and other Hub CLIPs: config.json + model.safetensors or
pytorch_model.bin) as the equivalent open_clip CLIP: the config mapped field by field, the weights key by key, so
that every path of the engine (the vectorized one included) runs on them."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.loading import lora
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
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
"""Concatenated, in this order, into open_clip's ``attn.in_proj_weight``."""
ENCODER_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")


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
            "mlp_ratio": exact_mlp_ratio(width, tower.get("intermediate_size", default_mlp)),
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


def exact_mlp_ratio(width: int, mlp_width: int) -> float:
    """The ``mlp_ratio`` for which open_clip builds exactly ``mlp_width`` (it builds ``int(width · mlp_ratio)``, and
    intermediate / width in floats may land just below, e.g. 115 / 56 · 56 = 114.99…): the smallest float at or above
    that quotient whose product with the width reaches the width asked for."""
    ratio = mlp_width / width
    while int(width * ratio) < mlp_width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def mlp_width(width: int, mlp_ratio: float) -> int:
    """The MLP width open_clip builds for a tower (how configs are compared: the ratio is only its means)."""
    return int(width * mlp_ratio)


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
        for fields in (ours, theirs):
            fields["mlp_ratio"] = mlp_width(fields["width"], fields["mlp_ratio"])  # compared as the width built
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


# ---------------------------------------------------------------------------------------------- peft LoRA on CLIPModel
def open_clip_target(module: str) -> tuple[str, int | None, bool] | None:
    """The converted model's parameter a CLIPModel Linear layer becomes: (name, which third of the fused q/k/v rows,
    transposed), or None for a module that is no such layer."""
    if f"{module}.weight" in TRANSPOSED_KEYS:
        return TRANSPOSED_KEYS[f"{module}.weight"], None, True
    layer = ENCODER_LAYER.match(module)
    if layer is None:
        return None
    tower, index, name = layer.groups()
    block = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}."
    if name in QKV:
        return f"{block}attn.in_proj_weight", QKV.index(name), False
    if name in LAYER_KEYS and name not in ("layer_norm1", "layer_norm2"):
        return f"{block}{LAYER_KEYS[name]}.weight", None, False
    return None


def made_on_clipmodel(factors: list[lora.PeftFactors], config: dict) -> bool:
    """Whether a peft adapter was made on a transformers CLIPModel: peft recorded that class, or its modules have a
    CLIPModel's names."""
    return lora.peft_base_class(config) == "CLIPModel" or any(open_clip_target(f.module) for f in factors)


def read_peft_adapter(folder: Path, config: dict, skeleton: nn.Module, field: str) -> lora.LoraAdapter:
    """A peft LoRA adapter made on a transformers CLIPModel as low-rank updates of the converted open_clip model
    (``skeleton``: names and shapes): q/k/v updates on their rows of ``in_proj_weight``, out_proj, fc1 and fc2 on
    theirs, the visual and text projections transposed (P = Wᵀ, so ΔP = s·Aᵀ·Bᵀ). Every mismatch is an error naming
    the option, before any weights load."""
    wrapped = lora.peft_base_class(config)
    if wrapped not in (None, "CLIPModel"):
        raise InputError(
            f"{field}: {folder} is an adapter made on a {wrapped}, and the generalist is a transformers CLIPModel: "
            "an adapter for another base model?"
        )
    factors, others = lora.read_peft_factors(folder, config, field)
    if others:
        raise InputError(
            f"{field}: {folder} holds whole tensors {sorted(others)[:4]} (modules_to_save): on a transformers "
            "CLIPModel only LoRA factors of its Linear layers are read"
        )
    params = dict(skeleton.named_parameters())
    updates = []
    for factor in factors:
        target = open_clip_target(factor.module)
        if target is None or target[0] not in params:
            raise InputError(
                f"{field}: {folder} targets {factor.module}, which is not a Linear layer of this CLIPModel (the "
                "encoder layers' q/k/v/out_proj, fc1, fc2, or visual_projection / text_projection): an adapter for "
                "another base model?"
            )
        name, third, transposed = target
        shape = tuple(params[name].shape)
        expected = shape[::-1] if transposed else shape if third is None else (shape[0] // 3, shape[1])
        if (factor.up.shape[0], factor.down.shape[1]) != expected:
            raise InputError(
                f"{field}: {folder}: {factor.module}'s update is {factor.up.shape[0]}×{factor.down.shape[1]} but "
                f"that layer of the generalist is {expected[0]}×{expected[1]}: an adapter for another base model?"
            )
        if transposed:
            updates.append(lora.LowRankUpdate(name, factor.up.T.contiguous(), factor.down.T.contiguous(), factor.scale))
        else:
            rows = None if third is None else (third * expected[0], (third + 1) * expected[0])
            updates.append(lora.LowRankUpdate(name, factor.down, factor.up, factor.scale, rows))
    if not updates:
        raise InputError(f"{field}: {folder} holds no LoRA update")
    return lora.LoraAdapter("LoRA (peft)", str(folder), updates)
