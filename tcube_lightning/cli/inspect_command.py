"""``inspect``: what a checkpoint is, read the way ``test`` reads it, before a run is set up around it: its format, the
architecture it fits (or, from its shapes, the nearest open_clip config), the mapping its keys need, a learned prompt
context, a LoRA adapter's ranks and targets, and with ``--generalist`` how far each tower moved from it
(‖θ − θ_pt‖ / ‖θ_pt‖: whether the text tower was fine-tuned, so whether ``merge_text`` matters).

    python main.py inspect expert.pt [more …] [--arch ViT-B-16] [--generalist clip.pt] [--json]

A file that cannot be read is one line on stderr, naming it and why; the command then exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, NoReturn

import open_clip
import torch
from torch import nn

from tcube_lightning.cli.commands import fail, long_options, say_error
from tcube_lightning.errors import InputError
from tcube_lightning.loading import layouts, lora, openclip_files, transformers_clip
from tcube_lightning.loading.architecture import Architecture, register_model_config
from tcube_lightning.loading.sources import (
    PEFT,
    ROBUSTMEDCLIP,
    TORCHSCRIPT,
    TRANSFORMERS,
    identify,
    load_source,
    peft_adapter,
    resolve_architecture,
)

FIELD = "checkpoint"
"""How errors name what they are about (with the file's path)."""


class InspectParser(argparse.ArgumentParser):
    """argparse's parser, its errors said as every command's (one line, then where the help is)."""

    def error(self, message: str) -> NoReturn:
        fail(message, self.prog, known=long_options(self))


def parser() -> argparse.ArgumentParser:
    """The command's options (``main`` parses with it)."""
    parser = InspectParser(
        prog="main.py inspect",
        description="Say what each checkpoint is, read as `test` reads it (format, architecture, mapping, learned "
        "context, LoRA ranks and targets; with --generalist, how far each tower moved).",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="CHECKPOINT",
        help="checkpoint files or folders (peft adapters, transformers CLIPModels)",
    )
    parser.add_argument("--arch", help="check each file against this architecture (as --model.arch)")
    parser.add_argument("--generalist", help="the generalist: each tower's relative change from it")
    parser.add_argument("--key_prefix", help="the prefix to read under, where a file holds weights under several")
    parser.add_argument("--model_config", help="an open_clip JSON config defining --arch")
    parser.add_argument("--cache_dir", help="the Hugging Face cache (pretrained tags, hf-hub: models)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file, for scripts")
    return parser


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    try:
        if args.model_config is not None:
            register_model_config(args.model_config)
        architecture = _architecture(args.arch, args.generalist, args.cache_dir)
        generalist = None if args.generalist is None else _generalist(architecture, args.generalist, args.key_prefix)
    except InputError as err:
        _refuse(err)
    failed = False
    for path in args.paths:
        try:
            report = inspect_checkpoint(Path(path), architecture, generalist, args.key_prefix)
        except InputError as err:
            say_error(str(err))
            failed = True
            continue
        print(json.dumps(report) if args.json else as_text(report))
    if failed:
        sys.exit(2)


def _refuse(err: InputError) -> None:
    say_error(str(err))
    sys.exit(2)


def _architecture(arch: str | None, generalist: str | None, cache_dir: str | None) -> Architecture | None:
    """``--arch``; else, for ``--generalist``, the open_clip config its shapes match."""
    if arch is not None or (generalist is not None and transformers_clip.is_transformers_folder(generalist)):
        return resolve_architecture(arch, generalist, cache_dir)
    if generalist is None:
        return None
    shapes = _file_shapes(Path(generalist), "--generalist")
    exact = nearest_configs(shapes)[0] if shapes else None
    if exact is None or exact[1]:
        raise InputError(f"--generalist: {generalist} matches no open_clip config by its shapes: give --arch")
    return resolve_architecture(exact[0], None, cache_dir)


def _generalist(architecture: Architecture, path: str, key_prefix: str | None) -> nn.Module:
    source = identify(path, architecture, "--generalist", key_prefix)
    if source.kind in (PEFT, ROBUSTMEDCLIP):
        raise InputError(f"--generalist: {path} is a {source.kind}, which describes an expert, not a generalist")
    return load_source(architecture, source)[0]


def inspect_checkpoint(
    path: Path, architecture: Architecture | None, generalist: nn.Module | None, key_prefix: str | None = None
) -> dict[str, Any]:
    """One checkpoint, as ``test`` would read it: see the module's docstring."""
    report: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        return report | _inspect_folder(path, architecture, generalist)
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder")
    if openclip_files.is_torchscript_archive(path):
        report["format"] = TORCHSCRIPT
        if architecture is not None:
            model = openclip_files.load_openai_archive(architecture, path)
            report |= {"architecture": architecture.label} | _changes(generalist, model)
        return report
    if not openclip_files.looks_like_a_checkpoint(path):
        raise openclip_files.not_a_checkpoint(FIELD, path)
    keys = openclip_files.checkpoint_keys(path, FIELD)  # a pickled module is refused here
    if not keys:  # what torch cannot read: its reason
        layouts.read_checkpoint(path, FIELD)
        raise InputError(f"{path}: holds no tensors")
    if lora.is_robustmedclip_checkpoint(keys):
        report["format"] = ROBUSTMEDCLIP
        if generalist is not None:
            adapter = lora.read_robustmedclip(path, generalist, FIELD)
            report |= {"lora": _lora(adapter)} | _changes(generalist, adapter.expert(generalist))
        return report
    report["format"] = "state_dict (" + ("safetensors" if path.suffix == ".safetensors" else "torch") + ")"
    if architecture is None:
        shapes = _file_shapes(path, FIELD)
        return report | _nearest(shapes) | {"mapping": _mapping_by_shape(path)}
    source = identify(str(path), architecture, FIELD, key_prefix)
    mapping = layouts.Mapping(source.details["prefix"], source.details["layout"])
    report |= {"architecture": architecture.label, "mapping": mapping.record()}
    if source.details["layout"] == layouts.PROMPT_LEARNER and generalist is None:
        report["mapping"]["from_generalist"] = list(layouts.FROM_GENERALIST)
        return report | {"learned_context": _context(path, source.details["prefix"])}
    model, mapped = load_source(architecture, source, generalist)
    report["mapping"] = mapped.mapping.record()
    report["learned_context"] = report["mapping"].pop("learned_context", None)
    return report | _changes(generalist, model)


def _inspect_folder(path: Path, architecture: Architecture | None, generalist: nn.Module | None) -> dict[str, Any]:
    if lora.is_peft_adapter(path):
        config = lora.read_peft_config(path, FIELD)
        report: dict[str, Any] = {"format": PEFT}
        report["lora"] = {
            "rank": config.get("r"),
            "alpha": config.get("lora_alpha"),
            "targets": config["target_modules"],
        }
        if architecture is not None:
            source = identify(str(path), architecture, FIELD)
            adapter = peft_adapter(architecture, source)
            report["lora"] = _lora(adapter)
            if generalist is not None:
                report |= _changes(generalist, adapter.expert(generalist))
        return report
    if transformers_clip.is_transformers_folder(path):
        config = transformers_clip.read_config(path, FIELD)
        converted = transformers_clip.open_clip_config(config, FIELD)
        report = {"format": TRANSFORMERS} | _nearest(_config_shapes(converted))
        if architecture is not None:
            source = identify(str(path), architecture, FIELD)
            report |= {"architecture": architecture.label} | _changes(generalist, load_source(architecture, source)[0])
        return report
    raise InputError(f"{path}: a folder holding neither adapter_config.json (peft) nor config.json (a CLIPModel)")


def _lora(adapter: lora.LoraAdapter) -> dict:
    summary = adapter.summary()
    return {key: summary[key] for key in ("rank", "scale", "targets", "replaced")}


def _context(path: Path, prefix: str) -> dict | None:
    context = layouts.flat_keys(layouts.read_checkpoint(path, FIELD)).get(prefix + layouts.CONTEXT_KEY)
    return None if context is None else {"n_ctx": context.shape[0], "width": context.shape[-1]}


def _changes(generalist: nn.Module | None, model: nn.Module) -> dict:
    """Each tower's relative change from the generalist, ‖θ − θ_pt‖ / ‖θ_pt‖ (float64)."""
    if generalist is None:
        return {}
    ours, theirs = dict(generalist.named_parameters()), dict(model.named_parameters())
    towers: dict[str, tuple[float, float]] = {"image": (0.0, 0.0), "text": (0.0, 0.0)}
    for name, value in theirs.items():
        if name == "logit_scale" or name.endswith(layouts.CONTEXT_KEY.rsplit(".", 1)[-1]) or name not in ours:
            continue
        tower = "image" if name.startswith("visual.") else "text"
        difference = float((value.double() - ours[name].double()).pow(2).sum())
        size = float(ours[name].double().pow(2).sum())
        towers[tower] = (towers[tower][0] + difference, towers[tower][1] + size)
    return {"relative_change": {tower: math.sqrt(d / s) if s else 0.0 for tower, (d, s) in towers.items()}}


def _file_shapes(path: Path, field: str) -> dict[str, int] | None:
    flat = layouts.flat_keys(layouts.read_checkpoint(path, field))
    prefix, layout = _anchor(list(flat))
    if prefix is None:
        return None
    renamed = {layouts.renamed(k[len(prefix) :], layout): v for k, v in flat.items() if k.startswith(prefix)}
    return _state_shapes(renamed)


def _anchor(keys: list[str]) -> tuple[str | None, str]:
    """The prefix and layout under which a CLIP ViT's patch embedding appears."""
    for layout, anchor in (
        (layouts.OPEN_CLIP, "visual.conv1.weight"),
        (layouts.PROMPT_LEARNER, "image_encoder.conv1.weight"),
    ):
        for key in keys:
            if key.endswith(anchor) and (key == anchor or key[-len(anchor) - 1] == "."):
                return key[: -len(anchor)], layout
    return None, layouts.OPEN_CLIP


def _mapping_by_shape(path: Path) -> dict:
    prefix, layout = _anchor(list(layouts.flat_keys(layouts.read_checkpoint(path, FIELD))))
    return {"stripped": prefix or None, "layout": layout}


def _state_shapes(state: dict[str, torch.Tensor]) -> dict[str, int] | None:
    """A CLIP ViT's config fields from its state_dict's shapes (open_clip's names)."""
    if "visual.conv1.weight" not in state:
        return None
    conv, positions = state["visual.conv1.weight"].shape, state["visual.positional_embedding"].shape[0]
    shapes = {
        "embed_dim": state["visual.proj"].shape[1] if "visual.proj" in state else None,
        "vision width": conv[0],
        "vision layers": _layers(state, "visual.transformer.resblocks."),
        "patch size": conv[-1],
        "image size": conv[-1] * math.isqrt(positions - 1),
    }
    if "positional_embedding" in state:
        shapes |= {
            "text width": state["positional_embedding"].shape[1],
            "text layers": _layers(state, "transformer.resblocks."),
            "context length": state["positional_embedding"].shape[0],
            "vocab size": state["token_embedding.weight"].shape[0] if "token_embedding.weight" in state else None,
        }
    return {k: int(v) for k, v in shapes.items() if v is not None}


def _layers(state: dict, prefix: str) -> int:
    return len({key[len(prefix) :].split(".", 1)[0] for key in state if key.startswith(prefix)})


def _config_shapes(config: dict) -> dict[str, int] | None:
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if "width" not in vision or "patch_size" not in vision:
        return None
    image = vision.get("image_size", 224)
    shapes = {
        "embed_dim": config.get("embed_dim"),
        "vision width": vision["width"],
        "vision layers": vision.get("layers"),
        "patch size": vision["patch_size"],
        "image size": image if isinstance(image, int) else image[0],
        "text width": text.get("width"),
        "text layers": text.get("layers"),
        "context length": text.get("context_length", 77),
        "vocab size": text.get("vocab_size", 49408),
    }
    return {k: int(v) for k, v in shapes.items() if isinstance(v, int)}


def nearest_configs(shapes: dict[str, int]) -> list[tuple[str, list[str]]]:
    """open_clip's configs by how many of ``shapes``' fields they differ in (each with those fields), nearest first."""
    found = []
    for name in open_clip.list_models():
        theirs = _config_shapes(open_clip.get_model_config(name) or {})
        if theirs is None:
            continue
        differing = [f for f in shapes if theirs.get(f) != shapes[f]]
        found.append((name, differing))
    return sorted(found, key=lambda item: (len(item[1]), item[0]))


def _nearest(shapes: dict[str, int] | None) -> dict:
    """The shapes and the open_clip configs that fit them (every exact one), else the nearest with what differs."""
    if shapes is None:
        return {"shapes": None, "nearest": "not a CLIP ViT layout (give --arch to check it against one)"}
    ranked = nearest_configs(shapes)
    exact = [name for name, differing in ranked if not differing]
    if exact:
        return {"shapes": shapes, "fits": exact}
    name, differing = ranked[0]
    return {"shapes": shapes, "nearest": {"config": name, "differs_in": differing}}


def as_text(report: dict[str, Any]) -> str:
    """The report as aligned lines for people."""
    lines = [report["path"]]
    for key, value in report.items():
        if key != "path" and value is not None:
            shown = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
            if isinstance(value, dict) and key == "relative_change":
                shown = ", ".join(f"{k} tower {v:.4f}" for k, v in value.items())
            lines.append(f"  {key.replace('_', ' ')}: {shown}")
    return "\n".join(lines)
