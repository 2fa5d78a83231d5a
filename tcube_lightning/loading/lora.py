"""LoRA experts: the generalist plus low-rank updates θ_ft = θ_pt + s·B·A on the adapter's targets only.

Two formats are read, each as its own code computes the expert:
- a peft adapter folder (adapter_config.json + adapter_model.safetensors / .bin), on an open_clip model (timm and
  Hugging Face towers included); on ``nn.MultiheadAttention`` peft updates ``in_proj_weight`` and applies its
  ``out_proj`` update twice, in its forward and in its merge alike (peft PR #3774): the expert is the model peft
  computes, so that update counts twice here too;
- a RobustMedCLIP ``model.pth`` (its own LoRA on the q, k and v rows of every timm ``qkv``, no scaling; its
  lora_weights.safetensors lacks k's LoRA, so the model.pth is what describes the expert).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.loading.tensorfiles import read_tensors

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
HANDLED_FIELDS = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
    "auto_mapping",
    "base_model_name_or_path",
}
NO_EFFECT_FIELDS = {
    "lora_dropout",
    "inference_mode",
    "revision",
    "task_type",
    "peft_version",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "qalora_group_size",
    "ensure_weight_tying",
}
"""Fields that shape training, not the trained expert. Every other field must be unset (a clear error otherwise):
each changes what the adapter computes (DoRA, bias training, trainable tokens, …) in ways not read here."""
BASE_INDEPENDENT_INITS = (True, False, "gaussian", "orthogonal", "eva")
"""Initialisations that leave the base weights alone; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) change them,
so the adapter only fits the changed base unless saved converted."""
PEFT_MHA_NOTE = (
    "peft applies the out_proj update of an nn.MultiheadAttention target twice, in its forward and its merge alike "
    "(peft PR #3774); the expert here is the model peft computes"
)
ROBUSTMEDCLIP_PREFIX, ROBUSTMEDCLIP_TEXT = "lora_vit.lora_vit.", "text_encoder."
ROBUSTMEDCLIP_LORA = re.compile(r"(.*\.attn\.qkv)\.linear_([ab])_([qkv])\.weight$")


@dataclass(frozen=True)
class LowRankUpdate:
    """``parameter[rows] += scale · up @ down`` (rows: a slice of a fused q/k/v weight, else every row)."""

    parameter: str
    down: torch.Tensor
    """A: (rank, in)."""
    up: torch.Tensor
    """B: (out, rank)."""
    scale: float
    rows: tuple[int, int] | None = None

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraAdapter:
    """An expert given as the generalist plus low-rank updates (and, for peft's ``modules_to_save``, whole tensors
    that replace the generalist's)."""

    kind: str
    location: str
    updates: list[LowRankUpdate]
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def expert(self, base: nn.Module) -> nn.Module:
        """A copy of ``base`` with every update applied: the expert as a full model."""
        expert = copy.deepcopy(base)
        self.apply(dict(expert.named_parameters()))
        return expert

    @torch.no_grad()
    def apply(self, params: dict[str, torch.Tensor]) -> None:
        """Turn the generalist's ``params`` into the expert's, in place: each update added, each replacement copied."""
        for update in self.updates:
            param = params[update.parameter]
            rows = slice(*update.rows) if update.rows else slice(None)
            param[rows] += update.delta().to(param.dtype)
        for name, value in self.replacements.items():
            params[name].copy_(value)

    def restricted(self, names: Iterable[str]) -> LoraAdapter:
        """This adapter's updates and replacements of ``names`` alone (to apply to those parameters only)."""
        names = set(names)
        updates = [u for u in self.updates if u.parameter in names]
        replacements = {n: v for n, v in self.replacements.items() if n in names}
        return dataclasses.replace(self, updates=updates, replacements=replacements)

    def changed_parameters(self) -> set[str]:
        """The parameters the expert has other values of: the targets and the replaced tensors."""
        return {u.parameter for u in self.updates} | set(self.replacements)

    def summary(self) -> dict:
        """What results.json records of the expert: its kind, rank(s), scale(s) and targets."""
        return {
            "kind": self.kind,
            "location": self.location,
            "rank": sorted({u.down.shape[0] for u in self.updates}),
            "scale": sorted({u.scale for u in self.updates}),
            "targets": sorted({u.parameter for u in self.updates}),
            "replaced": sorted(self.replacements),
            "notes": self.notes,
        }


# ----------------------------------------------------------------------------------------------------------- peft
def is_peft_adapter(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PEFT_CONFIG).is_file()


def read_peft_config(folder: Path, field_name: str) -> dict:
    """adapter_config.json, refused with the field named where it describes something other than plain LoRA."""
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{field_name}: {folder / PEFT_CONFIG} is not valid JSON: {err}") from err
    where = f"{field_name}: {folder / PEFT_CONFIG}"
    if config.get("peft_type") != "LORA":
        raise InputError(f"{where}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (LORA) are supported")
    if config.get("bias", "none") != "none":
        raise InputError(f"{where}: bias is {config['bias']!r}: adapters that train biases are not supported ('none')")
    if config.get("fan_in_fan_out"):
        raise InputError(f"{where}: fan_in_fan_out is true (GPT-2 Conv1D layers); CLIP towers use nn.Linear")
    if config.get("init_lora_weights", True) not in BASE_INDEPENDENT_INITS:
        raise InputError(
            f"{where}: init_lora_weights is {config['init_lora_weights']!r}, which changes the base weights: the "
            "adapter fits only that changed base. Save it converted (peft's path_initial_model_for_weight_conversion)"
        )
    unsupported = {k: v for k, v in config.items() if k not in HANDLED_FIELDS | NO_EFFECT_FIELDS and v}
    if unsupported:
        raise InputError(
            f"{where}: {unsupported} not supported (plain LoRA only: these change what the adapter computes)"
        )
    if not any((folder / name).is_file() for name in PEFT_WEIGHTS):
        raise InputError(f"{field_name}: {folder} has {PEFT_CONFIG} but none of {list(PEFT_WEIGHTS)}")
    return config


@dataclass(frozen=True)
class PeftFactors:
    """One LoRA module of a peft adapter as saved: its name (relative to the module peft wrapped), A and B, and its
    scale s (alpha/r, alpha/√r with rsLoRA; peft's rank_pattern / alpha_pattern applied)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float


def read_peft_factors(folder: Path, config: dict, field_name: str) -> tuple[list[PeftFactors], dict[str, torch.Tensor]]:
    """Every LoRA module's factors, each pair complete and of the rank adapter_config.json gives it, and the
    adapter's other tensors (modules_to_save copies) by name; nothing of the base model is needed."""
    weights = next(folder / name for name in PEFT_WEIGHTS if (folder / name).is_file())
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_tensors(weights, field_name).items()}
    factors = []
    for key in sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}):
        if f"{key}.lora_A.weight" not in tensors or f"{key}.lora_B.weight" not in tensors:
            kinds = sorted(k.rsplit(".", 2)[-2] for k in tensors if k.startswith(f"{key}.lora_"))
            raise InputError(
                f"{field_name}: {folder}: {key} has {kinds}; only lora_A/lora_B of Linear and "
                "MultiheadAttention targets are supported (no embedding or DoRA tensors)"
            )
        down, up = tensors.pop(f"{key}.lora_A.weight"), tensors.pop(f"{key}.lora_B.weight")
        owner = key.removesuffix(".base_layer.out_proj").replace(".base_layer", "")  # what the config names
        rank, alpha = _rank_and_alpha(config, owner)
        if down.shape[0] != rank or up.shape[1] != down.shape[0]:
            raise InputError(
                f"{field_name}: {folder}: {key} has rank {down.shape[0]} (lora_A) and {up.shape[1]} (lora_B) but "
                f"adapter_config.json says r={rank}"
            )
        factors.append(PeftFactors(key, down, up, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)))
    return factors, tensors


def read_peft_adapter(folder: Path, config: dict, base: nn.Module, field_name: str) -> LoraAdapter:
    """The adapter's updates on ``base``, an open_clip model (its skeleton suffices: names and shapes are read, no
    values): every target resolved, shaped and ranked as the config says, or a clear error (an adapter for another
    base, a rank mismatch, an unsupported target)."""
    factors, tensors = read_peft_factors(folder, config, field_name)
    prefix = _wrapped_prefix(base, config, folder, field_name)
    modules = dict(base.named_modules())
    params = dict(base.named_parameters())
    updates, replacements, notes = [], {}, []
    for factor in factors:
        key, down, up, scale = factor.module, factor.down, factor.up, factor.scale
        inner_out_proj = key.endswith(".base_layer.out_proj")
        module_name = prefix + key.replace(".base_layer", "")
        module = modules.get(module_name)
        if module is None:
            raise InputError(
                f"{field_name}: {folder} targets {module_name}, which the generalist ({type(base).__name__}) does "
                "not have: an adapter for another base model?"
            )
        parameter = _target_parameter(module, module_name, field_name, folder)
        target = params[parameter]
        if (up.shape[0], down.shape[1]) != tuple(target.shape):
            raise InputError(
                f"{field_name}: {folder}: {module_name}'s update is {up.shape[0]}×{down.shape[1]} but "
                f"the generalist's {parameter} is {tuple(target.shape)}: an adapter for another base "
                "model?"
            )
        if inner_out_proj:
            scale, notes = 2 * scale, [PEFT_MHA_NOTE]
        elif isinstance(modules.get(module_name.rsplit(".", 1)[0]), nn.MultiheadAttention):
            if up.abs().max() > 0:  # targeted on its own, peft's forward never calls it: its update would be lost
                raise InputError(
                    f"{field_name}: {folder} targets {module_name}, the out_proj of an "
                    "nn.MultiheadAttention, on its own: peft's forward ignores that update while its "
                    "merge applies it. Target the attention module itself"
                )
            continue
        updates.append(LowRankUpdate(parameter, down, up, scale))
    for key, value in tensors.items():  # what is left: whole tensors of modules_to_save
        name = prefix + key
        saved = config.get("modules_to_save") or []
        if name not in params or not any(name.rsplit(".", 1)[0].endswith(m) for m in saved):
            raise InputError(
                f"{field_name}: {folder}: tensor {key} is neither a LoRA factor nor a parameter of the "
                f"modules_to_save {saved} in the generalist"
            )
        if value.shape != params[name].shape:
            raise InputError(
                f"{field_name}: {folder}: {key} is {tuple(value.shape)}, the generalist's {tuple(params[name].shape)}"
            )
        replacements[name] = value
    if not updates and not replacements:
        raise InputError(f"{field_name}: {folder} holds no LoRA update")
    return LoraAdapter("LoRA (peft)", str(folder), updates, replacements, notes)


def peft_base_class(config: dict) -> str | None:
    """The class of the model peft wrapped, as it recorded it (auto_mapping), if it did."""
    return (config.get("auto_mapping") or {}).get("base_model_class")


def _wrapped_prefix(base: nn.Module, config: dict, folder: Path, field_name: str) -> str:
    """Where in the CLIP the module peft wrapped sits (its module names are relative to it): the whole model, or
    one tower, by the class name peft recorded in auto_mapping."""
    wrapped = peft_base_class(config)
    if wrapped is None or wrapped == type(base).__name__:
        return ""
    found = [name for name, module in base.named_modules() if type(module).__name__ == wrapped]
    if len(found) != 1:
        raise InputError(
            f"{field_name}: {folder}: the adapter was made on a {wrapped}, and the generalist "
            f"({type(base).__name__}) has {len(found)} modules of that class {found[:4]}: an adapter for another "
            "base model?"
        )
    return found[0] + "."


def _target_parameter(module: nn.Module, name: str, field_name: str, folder: Path) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return f"{name}.in_proj_weight"
    if isinstance(module, nn.Linear):
        return f"{name}.weight"
    raise InputError(
        f"{field_name}: {folder} targets {name}, a {type(module).__name__}: only nn.Linear and "
        "nn.MultiheadAttention targets are supported"
    )


def _rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    """r and lora_alpha for one module: peft's rank_pattern / alpha_pattern (first key matching the end of the
    module name) over the defaults."""

    def pattern(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module_name):
                return value
        return default

    return int(pattern(config.get("rank_pattern"), config["r"])), float(
        pattern(config.get("alpha_pattern"), config.get("lora_alpha", 8))
    )


# -------------------------------------------------------------------------------------------------- RobustMedCLIP
def is_robustmedclip_checkpoint(keys: list[str]) -> bool:
    return any(k.startswith(ROBUSTMEDCLIP_PREFIX) for k in keys) and any(ROBUSTMEDCLIP_LORA.match(k) for k in keys)


def read_robustmedclip(path: Path, base: nn.Module, field_name: str) -> LoraAdapter:
    """RobustMedCLIP's model.pth on ``base``: its image tower (``lora_vit.lora_vit.`` = ``visual.``, the timm
    ``qkv`` wrapped as ``qkv.qkv``) and text tower (``text_encoder.`` = ``text.``) must equal the generalist's,
    since only the LoRA was trained; q, k and v each get B·A on their rows of ``qkv.weight``, unscaled."""
    state = read_tensors(path, field_name)
    state = state.get("state_dict", state)
    reference = base.state_dict()
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        lora = ROBUSTMEDCLIP_LORA.match(key)
        if lora:
            module, which, part = lora.groups()
            factors.setdefault((_robustmedclip_name(module), part), {})[which] = value
            continue
        name = _robustmedclip_name(key).replace(".attn.qkv.qkv.", ".attn.qkv.")
        if name not in reference:
            if name.endswith("position_ids"):  # a buffer older transformers versions saved
                continue
            raise InputError(
                f"{field_name}: {path}: {key} has no counterpart {name} in the generalist: a "
                "RobustMedCLIP checkpoint of another base model?"
            )
        if value.shape != reference[name].shape or not torch.equal(value.to(reference[name].dtype), reference[name]):
            raise InputError(
                f"{field_name}: {path}: {key} differs from the generalist's {name}; RobustMedCLIP trains "
                "only its LoRA, so this is a LoRA of another base model"
            )
    params = dict(base.named_parameters())
    updates = []
    for (module, part), pair in sorted(factors.items()):
        weight = params.get(f"{module}.weight")
        if weight is None or set(pair) != {"a", "b"}:
            raise InputError(f"{field_name}: {path}: incomplete or misplaced LoRA factors at {module} ({part})")
        width = weight.shape[0] // 3
        offset = "qkv".index(part) * width
        down, up = pair["a"], pair["b"]
        if down.shape[1] != weight.shape[1] or up.shape[0] != width or up.shape[1] != down.shape[0]:
            raise InputError(
                f"{field_name}: {path}: the {part} LoRA at {module} ({tuple(up.shape)} @ "
                f"{tuple(down.shape)}) does not fit its {tuple(weight.shape)} qkv"
            )
        updates.append(LowRankUpdate(f"{module}.weight", down, up, 1.0, (offset, offset + width)))
    return LoraAdapter("LoRA (RobustMedCLIP)", str(path), updates)


def _robustmedclip_name(key: str) -> str:
    if key.startswith(ROBUSTMEDCLIP_PREFIX):
        return "visual." + key.removeprefix(ROBUSTMEDCLIP_PREFIX)
    if key.startswith(ROBUSTMEDCLIP_TEXT):
        return "text." + key.removeprefix(ROBUSTMEDCLIP_TEXT)
    return key
