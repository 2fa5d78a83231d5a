"""Where the two models come from: each checkpoint given is identified, and checked, before anything loads; then one
reader per source loads it.

| source | given as | generalist | expert |
|---|---|:-:|:-:|
| open_clip state_dict (plain, training-style, safetensors) | a file | yes | yes |
| OpenAI TorchScript archive | a file | yes | yes |
| open_clip pretrained tag, from the local cache | a tag of ``model.arch`` | yes | yes |
| a schema's own weights (``hf-hub:``, ``local-dir:``) | ``model.pretrained_checkpoint`` left out | yes | no |
| transformers CLIPModel | a folder with config.json | yes | yes |
| peft LoRA adapter | a folder with adapter_config.json | no | yes |
| RobustMedCLIP LoRA | its model.pth | no | yes |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import open_clip
from torch import nn

from tcube_lightning.errors import InputError
from tcube_lightning.loading import contexts, layouts, lora, openclip_files, transformers_clip
from tcube_lightning.loading.architecture import (
    SCHEMA_WEIGHTS,
    SCHEMAS,
    Architecture,
    named_architecture,
    register_model_config,
    schema_architecture,
)
from tcube_lightning.loading.layouts import MappedWeights

OPENCLIP_FILE, TORCHSCRIPT, TAG = "open_clip checkpoint", "OpenAI TorchScript archive", "open_clip pretrained tag"
SCHEMA_OWN, TRANSFORMERS = "the schema's own weights", "transformers CLIPModel"
PEFT, ROBUSTMEDCLIP = "peft LoRA adapter", "RobustMedCLIP LoRA checkpoint"
ADAPTERS = (PEFT, ROBUSTMEDCLIP)


@dataclass(frozen=True)
class Source:
    """One checkpoint as identified: its kind (above), where it is, and the option that named it."""

    kind: str
    location: str
    field: str
    details: dict = dataclasses.field(default_factory=dict)
    key_prefix: str | None = None
    """``model.key_prefix``: which prefix to read the weights under, where a file holds them under several."""
    """What identifying it read and loading needs again: a peft adapter's config (and, once checked against the
    generalist, the adapter), a CLIPModel's converted config."""


@dataclass
class LoadedModels:
    pretrained: nn.Module
    experts: dict[str, nn.Module | lora.LoraAdapter]
    """Each expert by name: a full model, or the LoRA adapter on ``pretrained`` that describes it."""
    record: dict
    """What results.json records about the models."""
    context_length: int | None = None
    """Where a model has a learned prompt context, its n_ctx (every full model then carries one: ``contexts``)."""

    @property
    def expert(self) -> nn.Module | lora.LoraAdapter:
        """The one expert of a one-expert plan."""
        (expert,) = self.experts.values()
        return expert


@dataclass(frozen=True)
class ModelPlan:
    """The architecture and every source, checked without loading weights; ``load`` then reads them."""

    architecture: Architecture
    pretrained: Source
    experts: dict[str, Source]
    """Each expert's source by name (``expert`` alone with ``model.expert_checkpoint``)."""

    def expected_normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) the generalist was trained with: its pretrained tag's, its transformers folder's
        preprocessor_config.json, else the architecture's config (a schema's preprocess_cfg), else OpenAI CLIP's."""
        mean, std = self.architecture.normalization()
        if self.pretrained.kind == TAG:
            tag = open_clip.get_pretrained_cfg(self.architecture.name, self.pretrained.location)
            mean, std = tag.get("mean", mean), tag.get("std", std)
        elif self.pretrained.kind == TRANSFORMERS:
            mean, std = transformers_clip.normalization(Path(self.pretrained.location)) or (mean, std)
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def check_preprocessing(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Before any weights load: the data's image size and normalisation are those the generalist expects."""
        label = self.architecture.label
        if image_size != self.architecture.image_size:
            raise InputError(
                f"data.image_size is {image_size} but {label} expects {self.architecture.image_size}-pixel images"
            )
        expected_mean, expected_std = self.expected_normalization()
        close = all(abs(a - b) <= 1e-6 for a, b in zip((*mean, *std), (*expected_mean, *expected_std)))
        if not close:
            raise InputError(
                f"data.mean/data.std are {list(mean)}/{list(std)} but the generalist ({self.pretrained.location}) was "
                f"trained with mean {list(expected_mean)} and std {list(expected_std)}: give --data.mean "
                f"'{list(expected_mean)}' --data.std '{list(expected_std)}'"
            )

    def load(self, context_init: str = contexts.CONTEXT_INIT, merge_text: bool = True) -> LoadedModels:
        """Every model, in eval mode; a LoRA expert as its adapter on the generalist. Where a file has a learned prompt
        context, every full model gets one (``contexts.give_contexts``: ``context_init`` and ``merge_text`` say how the
        others' is made)."""
        pretrained, pt_weights = load_source(self.architecture, self.pretrained)
        loaded = {name: self._load_expert(source, pretrained) for name, source in self.experts.items()}
        experts = {name: model for name, (model, _) in loaded.items()}
        files = {None: pt_weights, **{name: weights for name, (_, weights) in loaded.items()}}
        full = {None: pretrained, **{n: m for n, m in experts.items() if not isinstance(m, lora.LoraAdapter)}}
        own = {name: files[name].context for name in full if getattr(files[name], "context", None) is not None}
        heads = contexts.give_contexts(full, own, self.architecture.tokenizer(), context_init, merge_text)
        described = {
            name: expert.summary()
            if isinstance(expert, lora.LoraAdapter)
            else self._described(self.experts[name], files[name], heads.get(name))
            for name, expert in experts.items()
        }
        record = {
            "architecture": self.architecture.label,
            "pretrained": self._described(self.pretrained, pt_weights, heads.get(None)),
            **({"expert": described["expert"]} if list(described) == ["expert"] else {"experts": described}),
        }
        length = next(iter(own.values())).shape[0] if own else None
        return LoadedModels(pretrained, experts, record, length)

    @staticmethod
    def _described(source: Source, weights: MappedWeights | None, head: str | None) -> dict:
        """A full model's record: its kind and location, how its file was mapped, which zero-shot head it uses."""
        described = {"kind": source.kind, "location": source.location}
        if weights is not None:
            described["mapping"] = weights.mapping.record()
        return described | {"head": head or contexts.TEMPLATE_HEAD}

    def _load_expert(
        self, source: Source, pretrained: nn.Module
    ) -> tuple[nn.Module | lora.LoraAdapter, MappedWeights | None]:
        if source.kind == PEFT:
            return source.details["adapter"], None  # read and checked against the generalist's skeleton already
        if source.kind == ROBUSTMEDCLIP:
            return lora.read_robustmedclip(Path(source.location), pretrained, source.field), None
        return load_source(self.architecture, source, pretrained)


def plan_models(
    arch: str | None,
    pretrained_checkpoint: str | None,
    expert_checkpoint: str | None,
    cache_dir: str | None = None,
    model_config: str | None = None,
    experts: dict[str, str] | None = None,
    key_prefix: str | None = None,
) -> ModelPlan:
    """The architecture and every source, each checked (files present, formats known, configs that fit) without
    loading any weights: every error names its option. The experts: ``expert_checkpoint`` (one, named ``expert``) or
    ``experts`` (name → checkpoint). ``key_prefix``: the prefix to read weights under in a file that holds them under
    several (``layouts``)."""
    if model_config is not None:
        register_model_config(model_config)
    if expert_checkpoint is not None and experts:
        raise InputError("model.expert_checkpoint and model.experts exclude each other: one expert, or several by name")
    if expert_checkpoint is None and not experts:
        raise InputError(
            "model.expert_checkpoint (one expert: its checkpoint file, LoRA adapter or folder) or model.experts "
            "(several, name → checkpoint) is required"
        )
    architecture = resolve_architecture(arch, pretrained_checkpoint, cache_dir)
    pretrained = identify(pretrained_checkpoint, architecture, "model.pretrained_checkpoint", key_prefix)
    if pretrained.details.get("layout") == layouts.PROMPT_LEARNER:
        raise InputError(
            f"model.pretrained_checkpoint: {pretrained.location} is a prompt learner's file, which lacks "
            f"{list(layouts.FROM_GENERALIST)}: it can be an expert (they are taken from the generalist), not the "
            "generalist; give the CLIP it was built on"
        )
    if pretrained.kind in ADAPTERS:
        raise InputError(
            f"model.pretrained_checkpoint: {pretrained.location} is a {pretrained.kind}: a LoRA describes "
            "an expert on a generalist; give it as model.expert_checkpoint"
        )
    given = (
        {"expert": (expert_checkpoint, "model.expert_checkpoint")}
        if expert_checkpoint is not None
        else {name: (checkpoint, f"model.experts.{name}") for name, checkpoint in experts.items()}
    )
    sources = {}
    for name, (checkpoint, field) in given.items():
        source = identify(checkpoint, architecture, field, key_prefix)
        if source.kind == PEFT:
            source = dataclasses.replace(
                source, details={**source.details, "adapter": peft_adapter(architecture, source)}
            )
        sources[name] = source
    if architecture.is_schema:
        _check_tokenizer(architecture)
    return ModelPlan(architecture, pretrained, sources)


def peft_adapter(architecture: Architecture, expert: Source) -> lora.LoraAdapter:
    """A peft adapter's updates, read and checked against the generalist's parameter names and shapes (its skeleton:
    no weights load), with the module names of the model it was made on: open_clip's, or a transformers CLIPModel's
    mapped onto the converted model."""
    folder, config, skeleton = Path(expert.location), expert.details["config"], architecture.skeleton()
    if architecture.name is None:
        return transformers_clip.read_peft_adapter(folder, config, skeleton, expert.field)
    if transformers_clip.made_on_clipmodel(lora.read_peft_factors(folder, config, expert.field)[0], config):
        raise InputError(
            f"{expert.field}: {folder} is an adapter made on a transformers CLIPModel, and the generalist is "
            f"{architecture.label}: give that CLIPModel's folder as model.pretrained_checkpoint, model.arch left out"
        )
    return lora.read_peft_adapter(folder, config, skeleton, expert.field)


def resolve_architecture(arch: str | None, pretrained_checkpoint: str | None, cache_dir: str | None) -> Architecture:
    """``model.arch`` as an open_clip name or a schema; left out, the generalist's transformers config."""
    if arch is None:
        if pretrained_checkpoint is None or not transformers_clip.is_transformers_folder(pretrained_checkpoint):
            raise InputError(
                "model.arch: give an open_clip architecture name, hf-hub:org/repo or local-dir:DIR; it may be left "
                "out only when model.pretrained_checkpoint is a transformers CLIPModel folder (its config.json then "
                "gives the architecture)"
            )
        folder = Path(pretrained_checkpoint)
        config = transformers_clip.read_config(folder, "model.pretrained_checkpoint")
        model_cfg = transformers_clip.open_clip_config(config, "model.pretrained_checkpoint")
        return Architecture(None, model_cfg, {}, cache_dir, source=f"the CLIPModel config of {folder}")
    if arch.startswith(SCHEMAS):
        return schema_architecture(arch, cache_dir)
    return dataclasses.replace(named_architecture(arch), cache_dir=cache_dir)


def identify(checkpoint: str | None, architecture: Architecture, field: str, key_prefix: str | None = None) -> Source:
    """What a checkpoint option names, by what is there: a folder (peft adapter, transformers CLIPModel), a file
    (TorchScript archive, RobustMedCLIP LoRA, open_clip state_dict), a cached tag, or nothing (a schema's own
    weights)."""
    if checkpoint is None:
        if not architecture.is_schema:
            raise InputError(
                f"{field} is required (it may be left out only with a hf-hub: or local-dir: model.arch, "
                "whose own weights are then the generalist)"
            )
        if architecture.own_weights is None:
            raise InputError(
                f"{field} is left out, so the generalist is {architecture.name}'s own weights, but "
                f"{architecture.source} has none of {list(SCHEMA_WEIGHTS)}; give the weights file"
            )
        return Source(SCHEMA_OWN, architecture.own_weights, field)
    path = Path(checkpoint)
    if path.is_dir():
        return _identify_folder(path, architecture, field)
    if path.is_file():
        if openclip_files.is_torchscript_archive(path):
            return Source(TORCHSCRIPT, checkpoint, field)
        if not openclip_files.looks_like_a_checkpoint(path):
            raise openclip_files.not_a_checkpoint(field, path)
        keys = openclip_files.checkpoint_keys(path, field)
        if lora.is_robustmedclip_checkpoint(keys):
            return Source(ROBUSTMEDCLIP, checkpoint, field)
        mapping = {}
        if keys:  # its mapping found now, before anything loads (else the loader says why it cannot read it)
            expected = set(architecture.skeleton().state_dict())
            prefix, layout = layouts.choose_mapping(keys, expected, field, path, key_prefix)
            mapping = {"prefix": prefix, "layout": layout}
        return Source(OPENCLIP_FILE, checkpoint, field, mapping, key_prefix)
    if openclip_files.is_pretrained_tag(architecture, checkpoint):
        return Source(TAG, checkpoint, field)
    tags = (
        []
        if architecture.is_schema or architecture.name is None
        else open_clip.list_pretrained_tags_by_model(architecture.name)
    )
    raise InputError(
        f"{field}: file not found: {checkpoint} (expected a checkpoint file (open_clip state_dict, safetensors, "
        "OpenAI TorchScript, RobustMedCLIP model.pth), a folder (peft adapter, transformers CLIPModel)"
        + (
            f", or a pretrained tag of {architecture.name!r}: {tags or 'it has none'})"
            if not architecture.is_schema
            else ")"
        )
    )


def _identify_folder(folder: Path, architecture: Architecture, field: str) -> Source:
    if lora.is_peft_adapter(folder):
        return Source(PEFT, str(folder), field, {"config": lora.read_peft_config(folder, field)})
    if transformers_clip.is_transformers_folder(folder):
        config = transformers_clip.read_config(folder, field)
        converted = transformers_clip.open_clip_config(config, field)
        differences = transformers_clip.config_differences(architecture.model_cfg, converted)
        if differences:
            raise InputError(
                f"{field}: {folder} is a CLIPModel of another architecture than {architecture.label} "
                f"(architecture vs checkpoint): {differences[:6]}"
            )
        transformers_clip.weights_file(folder, field)
        return Source(TRANSFORMERS, str(folder), field, {"model_cfg": converted})
    present = sorted(p.name for p in folder.iterdir())[:10]
    raise InputError(
        f"{field}: {folder} is a folder holding neither adapter_config.json (a peft adapter) nor "
        f"config.json (a transformers CLIPModel); it holds {present}"
    )


def load_source(
    architecture: Architecture, source: Source, generalist: nn.Module | None = None
) -> tuple[nn.Module, MappedWeights | None]:
    """One full model, by its source's reader, and for a weights file how its keys were mapped (``layouts``; what a
    prompt learner's file lacks taken from ``generalist``)."""
    path = Path(source.location)
    if source.kind == TAG:
        return openclip_files.load_tag(architecture, source.location), None
    if source.kind == TORCHSCRIPT:
        return openclip_files.load_openai_archive(architecture, path), None
    if source.kind == TRANSFORMERS:
        state = transformers_clip.convert_state_dict(
            transformers_clip.read_state_dict(path, source.field), source.details["model_cfg"], source.field
        )
        model = architecture.create()
        model.load_state_dict(state, strict=True)
        return model, None
    return openclip_files.load_weights_file(architecture, path, source.field, source.key_prefix, generalist)


def load_clip(arch: str | None, checkpoint: str | Path | None, cache_dir: str | None = None) -> nn.Module:
    """One full model from any generalist source (see the table above), e.g. to inspect it."""
    architecture = resolve_architecture(arch, None if checkpoint is None else str(checkpoint), cache_dir)
    source = identify(None if checkpoint is None else str(checkpoint), architecture, "checkpoint")
    if source.kind in ADAPTERS:
        raise InputError(f"checkpoint: {checkpoint} is a {source.kind}, not a full model")
    return load_source(architecture, source)[0]


def _check_tokenizer(architecture: Architecture) -> None:
    """A schema's tokenizer loads (its files are in the folder or the cache), before any weights do."""
    try:
        architecture.tokenizer()
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(
            f"arch: the tokenizer of {architecture.name} could not be loaded ({err}); an offline cache needs the text "
            "repository's tokenizer files (tokenizer_config.json with vocab.txt or tokenizer.json) beside its "
            "config.json"
        ) from err
