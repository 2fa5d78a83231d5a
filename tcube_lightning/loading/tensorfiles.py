"""Reading a file of tensors by its format (safetensors, or torch's own), with an error that names the option and the
file when it is not one."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tcube_lightning.errors import InputError

LOAD_ERRORS = (RuntimeError, KeyError, ValueError, EOFError, OSError, AssertionError, pickle.UnpicklingError)
"""What torch (and open_clip, loading through it) raise for a file that is not the checkpoint it should be."""


def read_tensors(path: Path, field: str) -> dict[str, torch.Tensor]:
    """A safetensors file, else a torch file read with ``weights_only`` (tensors and containers, never code)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (*LOAD_ERRORS, SafetensorError) as err:
        raise InputError(f"{field}: {path} could not be read as a file of tensors ({err})") from err


def short_load_error(err: Exception, keep: int = 3) -> str:
    """torch's ``load_state_dict`` error on one line: each kind of difference with its count and first keys (its own
    message lists every key: kilobytes for a whole model of another architecture)."""
    text = str(err)
    parts = []
    for kind, keys in re.findall(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", text):
        names = re.findall(r'"([^"]+)"', keys)
        shown = ", ".join(names[:keep]) + (", …" if len(names) > keep else "")
        parts.append(f"{len(names)} {kind.lower()} key(s) ({shown})")
    shape = r"torch\.Size\((\[[^\]]*\])\)"
    sizes = re.findall(
        rf"size mismatch for ([^:]+): copying a param with shape {shape} from checkpoint.*?{shape}", text
    )
    if sizes:
        shown = ", ".join(f"{name} {theirs} vs {ours}" for name, theirs, ours in sizes[:keep])
        parts.append(f"{len(sizes)} tensor(s) of another shape, checkpoint vs model ({shown})")
    return "; ".join(parts) or " ".join(text.split())[:400]
