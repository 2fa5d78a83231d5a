"""Shared fixtures: a tiny open_clip pair (generalist and a perturbed expert) and MedMNIST-format npz files."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tcube_lightning import models  # noqa: E402, F401 - registers the tiny architecture

ARCH = "tcube-tiny-clip"
CLASSNAMES = ["circle", "square", "triangle", "cross"]
TEMPLATES = ["a photo of a {}.", "a medical image of a {}."]


def make_expert_state_dict(pretrained: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.1) -> dict:
    """An 'expert': every floating-point tensor of the pretrained state_dict plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * v.abs().mean().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
        if v.is_floating_point()
        else v
        for k, v in pretrained.items()
    }


@pytest.fixture(scope="session")
def clip_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Checkpoint files (plain open_clip state_dicts) of a tiny generalist and expert."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    pretrained = open_clip.create_model(ARCH).state_dict()
    pretrained["logit_scale"] = torch.tensor(math.log(100.0))  # CLIP's trained value: confident, distinct outputs
    expert = make_expert_state_dict(pretrained)
    torch.save(pretrained, folder / "pretrained.pt")
    torch.save(expert, folder / "expert.pt")
    return folder / "pretrained.pt", folder / "expert.pt"


def write_medmnist_npz(path: Path, n: int, num_classes: int, size: int = 28, rgb: bool = True, seed: int = 0) -> None:
    """A MedMNIST-format npz with the official keys and dtypes (uint8 images, uint8 (N, 1) labels)."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    arrays = {}
    for split, count in (("train", 4), ("val", 4), ("test", n)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape[1:]), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, num_classes, (count, 1), dtype=np.uint8)
    np.savez_compressed(path, **arrays)


@pytest.fixture(scope="session")
def npz_root(tmp_path_factory) -> Path:
    """A folder with two 28-px test splits: 37 RGB images and 21 grayscale images."""
    root = tmp_path_factory.mktemp("data")
    write_medmnist_npz(root / "tiny_a.npz", 37, len(CLASSNAMES), seed=0)
    write_medmnist_npz(root / "tiny_b.npz", 21, len(CLASSNAMES), rgb=False, seed=1)
    return root
