"""A CLIP's weights as other codebases save them, mapped onto the architecture's own keys: one nesting level
(``{'state_dict': …}``, ``{'model': …}``, ``{'ema': …}``, …), one key prefix (``module.``, ``model.``, ``clip_model.``,
``_orig_mod.``, …) and the prompt-learner layout of CoOp and the test-time prompt-tuning family (``image_encoder.``,
``text_encoder.``, ``prompt_learner.ctx``).

Nothing is guessed from names: the prefix is the one under which the architecture's own keys appear, all of them, and
the file is refused naming every candidate when there are several (``model.key_prefix`` chooses). Whole pickled
modules are refused before anything is unpickled (torch reads with ``weights_only``), saying how to re-save them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tcube_lightning.errors import InputError
from tcube_lightning.loading.tensorfiles import LOAD_ERRORS

OPEN_CLIP, PROMPT_LEARNER = "open_clip", "prompt learner"
PROMPT_LEARNER_KEYS = {"image_encoder.": "visual.", "text_encoder.": ""}
"""The prompt learner's towers (``ClipTestTimeTuning``: ``image_encoder = clip.visual``; ``text_encoder`` holds CLIP's
``transformer``, ``positional_embedding``, ``ln_final`` and ``text_projection``) → open_clip's keys."""
FROM_GENERALIST = ("token_embedding.weight", "logit_scale")
"""What a prompt learner's file lacks (the prompt learner holds the token embedding outside its state, and the logit
scale as a plain tensor): taken from the generalist."""
CONTEXT_KEY = "prompt_learner.ctx"
LEARNER_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
"""The prompt learner's embeddings of its own class names' prompts: recomputed from the run's class names."""


@dataclass(frozen=True)
class Mapping:
    """How a file's keys were mapped onto the architecture's."""

    prefix: str = ""
    """What was stripped before each key: a nesting level and a key prefix, ``.``-joined (``state_dict.module.``)."""
    layout: str = OPEN_CLIP
    from_generalist: tuple[str, ...] = ()
    context: tuple[int, int] | None = None
    """A learned prompt context's shape (n_ctx, width), if the file has one."""

    def record(self) -> dict:
        """For results.json (``models.<name>.mapping``) and ``inspect``."""
        record: dict = {"stripped": self.prefix or None, "layout": self.layout}
        if self.from_generalist:
            record["from_generalist"] = list(self.from_generalist)
        if self.context is not None:
            record["learned_context"] = {"n_ctx": self.context[0], "width": self.context[1]}
        return record


@dataclass
class MappedWeights:
    """A file's weights under the architecture's keys, what the mapping was, and its learned context if any."""

    state_dict: dict[str, torch.Tensor]
    mapping: Mapping
    context: torch.Tensor | None = None
    left: list[str] = field(default_factory=list)
    """Keys of the file outside the mapped prefix (the rest of a training checkpoint), left aside."""


def read_checkpoint(path: Path, field_name: str) -> dict:
    """A checkpoint file as tensors and containers (safetensors, or torch's format read with ``weights_only``); a
    whole pickled module is refused before anything is unpickled, with the two lines that re-save it."""
    if not path.is_file():
        raise InputError(f"{field_name}: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (*LOAD_ERRORS, SafetensorError) as err:
        refuse_pickled_module(err, field_name, path)
        raise InputError(f"{field_name}: {path} could not be read as a checkpoint ({_one_line(err)})") from err
    if not isinstance(checkpoint, dict):
        raise InputError(f"{field_name}: {path} holds a {type(checkpoint).__name__}, not a state_dict")
    return checkpoint


def refuse_pickled_module(err: Exception, field_name: str, path: Path) -> None:
    """torch's ``weights_only`` reader stops at the first class a pickle names, before it runs anything: a whole
    pickled module (``torch.save(model)``) is then refused with the two lines that re-save it."""
    pickled = re.search(r"GLOBAL ([\w.]+) was not an allowed global", str(err))
    if pickled:
        raise InputError(
            f"{field_name}: {path} is a whole pickled module ({pickled.group(1)}), which is not read (unpickling runs "
            "code); re-save its weights where it was made, from a file you trust: `model = torch.load(PATH, "
            "weights_only=False)`, then `torch.save(model.state_dict(), 'state_dict.pt')`"
        ) from err


def flat_keys(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by key, one nesting level joined with ``.``: ``{'ema': {'visual.…': t}}`` gives
    ``ema.visual.…`` (any top-level mapping of tensors: ``state_dict``, ``model``, ``module``, ``ema``, ``model_ema``,
    ``state_dict_ema``, …)."""
    flat = {}
    for key, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            flat[str(key)] = value
        elif isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items() if isinstance(v, torch.Tensor)})
    return flat


def map_weights(
    checkpoint: dict,
    expected: set[str],
    field_name: str,
    path: Path,
    key_prefix: str | None = None,
    generalist: dict[str, torch.Tensor] | None = None,
) -> MappedWeights:
    """The checkpoint's weights under the architecture's keys (``expected``: its state_dict's), found as the one prefix
    and layout that hold every one of them (a prompt learner's file: all but ``FROM_GENERALIST``, taken from
    ``generalist``). ``key_prefix`` chooses among several; none, or several, is an error naming them."""
    flat = flat_keys(checkpoint)
    prefix, layout = choose_mapping(list(flat), expected, field_name, path, key_prefix)
    state, context = {}, None
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        inner = key[len(prefix) :]
        if inner == CONTEXT_KEY:
            context = value
        elif inner.startswith("prompt_learner.") and inner not in LEARNER_BUFFERS:
            raise InputError(
                f"{field_name}: {path} has {inner!r}: of a prompt learner only the shared context (prompt_learner.ctx) "
                "is read; learned class tokens (TPT's learned_cls) are not supported"
            )
        elif inner not in LEARNER_BUFFERS:
            state[renamed(inner, layout)] = value
    missing = sorted(expected - set(state))
    taken: tuple[str, ...] = ()
    if missing:  # a prompt learner's: the token embedding and logit scale (what _candidates allowed)
        if generalist is None:
            raise InputError(
                f"{field_name}: {path} is a prompt learner's file without {missing}; it can be an expert (they are "
                "taken from the generalist), not the generalist: give the CLIP it was built on"
            )
        state.update({key: generalist[key] for key in missing})
        taken = tuple(missing)
    if context is not None:
        context = _shared_context(context, field_name, path)
    mapping = Mapping(prefix, layout, taken, None if context is None else tuple(context.shape))
    return MappedWeights(state, mapping, context, [k for k in flat if not k.startswith(prefix)])


def choose_mapping(
    keys: list[str], expected: set[str], field_name: str, path: Path, key_prefix: str | None = None
) -> tuple[str, str]:
    """The one (prefix, layout) under which a file's ``keys`` (one nesting level joined, ``flat_keys``) hold every key
    the architecture ``expected`` (a prompt learner's: all but ``FROM_GENERALIST``); ``key_prefix`` chooses among
    several. None, or several, is an error naming the file (and the candidates)."""
    candidates = _candidates(keys, expected)
    if len(candidates) > 1 and key_prefix is not None:  # chosen where there is a choice
        candidates = [c for c in candidates if c[0] == key_prefix]
    if not candidates:
        raise InputError(_no_mapping(field_name, path, keys, expected, key_prefix))
    if len(candidates) > 1:
        named = ", ".join(repr(prefix) for prefix, _ in candidates)
        raise InputError(
            f"{field_name}: {path} holds the architecture's weights under {len(candidates)} prefixes ({named}, e.g. a "
            "model and its EMA): choose one with --model.key_prefix"
        )
    return candidates[0]


def renamed(key: str, layout: str) -> str:
    if layout == PROMPT_LEARNER:
        for theirs, ours in PROMPT_LEARNER_KEYS.items():
            if key.startswith(theirs):
                return ours + key[len(theirs) :]
    return key


def _candidates(flat: list[str], expected: set[str]) -> list[tuple[str, str]]:
    """Every (prefix, layout) under which the file holds all the architecture's keys (a prompt learner's: all but
    ``FROM_GENERALIST``). Prefixes are found from where one of the architecture's keys ends a file's key."""
    anchor = max(expected - set(FROM_GENERALIST), key=len)
    found = []
    for layout in (OPEN_CLIP, PROMPT_LEARNER):
        theirs = _theirs(anchor, layout)
        prefixes = {
            k[: -len(theirs)] for k in flat if k.endswith(theirs) and (k == theirs or k[-len(theirs) - 1] == ".")
        }
        for prefix in sorted(prefixes):
            under = {renamed(k[len(prefix) :], layout) for k in flat if k.startswith(prefix)}
            needed = expected - set(FROM_GENERALIST) if layout == PROMPT_LEARNER else expected
            if needed <= under and (layout == OPEN_CLIP or any(k.startswith(prefix + "image_encoder.") for k in flat)):
                found.append((prefix, layout))
    return found


def _theirs(key: str, layout: str) -> str:
    """How a layout writes one of the architecture's keys."""
    if layout == PROMPT_LEARNER:
        return ("image_encoder." + key[len("visual.") :]) if key.startswith("visual.") else "text_encoder." + key
    return key


def _shared_context(context: torch.Tensor, field_name: str, path: Path) -> torch.Tensor:
    """The prompt learner's context, one for every class (n_ctx × width); a context per class or per batch row is
    refused."""
    if context.ndim != 2:
        raise InputError(
            f"{field_name}: {path} has a learned context of shape {tuple(context.shape)}: a context per class (CoOp's "
            "class-specific context) or per batch row is not supported; one shared n_ctx × width context is"
        )
    return context.float()


def _no_mapping(field_name: str, path: Path, flat: list[str], expected: set[str], key_prefix: str | None) -> str:
    if key_prefix is not None and flat:
        return f"{field_name}: {path} does not hold the architecture's weights under --model.key_prefix {key_prefix!r}"
    shown = sorted(flat)[:3]
    ours = sorted(expected)[:3]
    return (
        f"{field_name}: {path} does not hold the architecture's weights under any prefix or layout (its keys begin "
        f"{shown}, the architecture's {ours}): another architecture (`main.py inspect {path}` names the nearest), or "
        "a layout this tool does not read"
    )


def _one_line(err: Exception) -> str:
    """torch's reason on one line: what its unpickler stopped at, else its first sentence."""
    text = " ".join(str(err).split())
    cause = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text.split(". ")[0]
    return cause.strip()[:300]
