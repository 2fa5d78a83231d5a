"""Reading a file of tensors by its format (safetensors, or torch's own), with an error that names the option and the
file when it is not one."""

from __future__ import annotations

import pickle
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
