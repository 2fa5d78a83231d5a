"""Shared fixtures: a tiny open_clip pair (generalist and a perturbed expert) and MedMNIST-format npz files."""

from __future__ import annotations

import math
import os
import shutil

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


def write_medimeta(folder: Path, dataset_id: str, task: str, classnames: list[str], n: int, size: int = 28) -> None:
    """A MedIMeta data set in its on-disk layout: info.yaml, images.hdf5, task_labels/, splits/."""
    import h5py
    import yaml

    root = folder / dataset_id
    (root / "task_labels").mkdir(parents=True)
    (root / "splits").mkdir()
    rng = np.random.default_rng(3)
    total = n + 3  # three images that belong to the training split only
    labels = np.arange(total) % len(classnames)
    info = {
        "id": dataset_id, "name": dataset_id.upper(), "domain": "test", "input_size": [3, size, size],
        "tasks": [{"task_name": task, "task_target": "MULTICLASS_CLASSIFICATION",
                   "labels": dict(enumerate(classnames))}],
    }  # fmt: skip
    (root / "info.yaml").write_text(yaml.safe_dump(info))
    with h5py.File(root / "images.hdf5", "w") as h5:
        h5.create_dataset("images", data=rng.integers(0, 256, (total, size, size, 3), dtype=np.uint8))
    np.save(root / "task_labels" / f"{task}.npy", labels)
    (root / "splits" / "train.txt").write_text("".join(f"images/{i:06d}.tiff\n" for i in range(3)))
    (root / "splits" / "test.txt").write_text("".join(f"images/{i:06d}.tiff\n" for i in range(3, total)))


def write_medmnistc_stacked(folder: Path, flag: str, corruption: str, n: int, num_classes: int, size: int = 28) -> None:
    """medmnistc's own layout: {flag}/{corruption}.npz, the five severities stacked (severity k fills block k)."""
    (folder / flag).mkdir(parents=True, exist_ok=True)
    images = np.concatenate([np.full((n, size, size, 3), 40 * k, dtype=np.uint8) for k in range(1, 6)])
    labels = np.tile(np.arange(n) % num_classes, 5)[:, None].astype(np.uint8)
    np.savez_compressed(folder / flag / f"{corruption}.npz", test_images=images, test_labels=labels)


def write_modality_data(root: Path, flag: str, medimeta: tuple[str, str], corruptions: list[str], n: int = 10) -> None:
    """Every file a modality's protocol reads, at 28 px: MedMNIST npz, MedIMeta folder, MedMNIST-C files."""
    import medmnist

    num_classes = len(medmnist.INFO[flag]["label"])
    root.mkdir(parents=True, exist_ok=True)
    write_medmnist_npz(root / f"{flag}.npz", n, num_classes)
    write_medimeta(root / "medimeta", medimeta[0], medimeta[1], [f"novel class {i}" for i in range(3)], n)
    for corruption in corruptions:
        write_medmnistc_stacked(root / "medmnistc", flag, corruption, n, num_classes)


def write_hub_cache(cache: Path, repo: str, checkpoint: Path) -> None:
    """Hugging Face's cache layout for one downloaded file: refs/main names the snapshot holding it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / "0123abc").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abc")
    shutil.copy(checkpoint, folder / "snapshots" / "0123abc" / "open_clip_pytorch_model.bin")
