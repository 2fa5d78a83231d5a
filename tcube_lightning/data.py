"""MedMNIST-format test splits as CLIP-preprocessed tensors, and the LightningDataModule serving them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import open_clip
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from tcube_lightning.errors import InputError


def medmnist_filename(flag: str, size: int = 28) -> str:
    """MedMNIST's official file name: ``{flag}.npz`` at 28 px, ``{flag}_{size}.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def medmnist_classnames(flag: str) -> list[str]:
    """Class names in label order, from MedMNIST's own metadata."""
    import medmnist

    if flag not in medmnist.INFO:
        raise InputError(f"flag: unknown MedMNIST dataset {flag!r}; known: {sorted(medmnist.INFO)}")
    labels = medmnist.INFO[flag]["label"]
    return [labels[str(i)] for i in range(len(labels))]


def read_medmnist_npz(path: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W[, 3]) uint8 and labels (N,) int64 of one split of a MedMNIST-format npz file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path} (expected a MedMNIST-format npz)")
    wanted = (f"{split}_images", f"{split}_labels")
    try:
        with np.load(path) as npz:
            keys = sorted(npz.files)
            arrays = {k: npz[k] for k in wanted if k in keys}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise InputError(f"{path}: not a readable npz file ({err})") from err
    missing = [k for k in wanted if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}; the file has {keys}")
    images, labels = arrays[wanted[0]], arrays[wanted[1]]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise InputError(
            f"{path}: {split}_images must be uint8 of shape (N, H, W) or (N, H, W, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(
            f"{path}: {split}_labels must have shape (N,) or (N, 1) with N = {len(images)}, got {labels.shape}"
        )
    if len(images) == 0:
        raise InputError(f"{path}: split {split!r} is empty")
    return images, labels.astype(np.int64)


class ImageArrayDataset(Dataset):
    """uint8 image arrays → RGB PIL → a CLIP preprocessing transform; yields (image tensor, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:  # noqa: ANN001 - any callable
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return self.transform(image), int(self.labels[index])


class MedMNISTDataModule(L.LightningDataModule):
    """Named test splits, each a MedMNIST-format npz file, as one test dataloader per split.

    Args:
        root: Folder that the split files are relative to.
        splits: Split name → npz file name, e.g. ``{in_domain: bloodmnist_224.npz}``. Order is kept.
        flag: MedMNIST dataset flag; class names come from ``medmnist.INFO`` when ``classnames`` is not given.
        classnames: Class names in label order (overrides ``flag``).
        templates: Prompt templates, each with one ``{}`` for the class name; their embeddings are averaged.
        split_key: Which split inside each npz file to read (``test``, ``val`` or ``train``).
        image_size: Side of the CLIP input; images are resized (bicubic), center-cropped and normalised.
        batch_size: Test batch size.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (faster host-to-GPU copies).
    """

    def __init__(
        self,
        root: str,
        splits: dict[str, str],
        flag: str | None = None,
        classnames: list[str] | None = None,
        templates: tuple[str, ...] = ("a photo of a {}.",),
        split_key: str = "test",
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if not splits:
            raise InputError("data.splits: give at least one split, e.g. {in_domain: bloodmnist.npz}")
        if classnames is None and flag is None:
            raise InputError("data: give either flag (a MedMNIST dataset, for its class names) or classnames")
        if batch_size < 1:
            raise InputError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        self.splits = dict(splits)
        self.classnames = list(classnames) if classnames is not None else medmnist_classnames(flag)
        self.templates = list(templates)
        self.split_key, self.image_size = split_key, image_size
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.datasets: dict[str, ImageArrayDataset] = {}

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def setup(self, stage: str | None = None) -> None:
        """Read and check every split before any model is loaded (Lightning calls this hook first)."""
        transform = open_clip.image_transform(self.image_size, is_train=False)
        for name, filename in self.splits.items():
            images, labels = read_medmnist_npz(self.root / filename, self.split_key)
            bad = (labels < 0) | (labels >= len(self.classnames))
            if bad.any():
                raise InputError(
                    f"{self.root / filename}: {int(bad.sum())} label(s) outside 0..{len(self.classnames) - 1} "
                    f"for {len(self.classnames)} class names (first bad label: {int(labels[bad][0])})"
                )
            self.datasets[name] = ImageArrayDataset(images, labels, transform)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per split. Under multi-process runs each process reads a disjoint share of every
        split, without the padding of PyTorch's DistributedSampler that would count samples twice."""
        return [
            DataLoader(
                self.datasets[name],
                batch_size=self.batch_size,
                sampler=self._sampler(name),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
            )
            for name in self.split_names
        ]

    def _sampler(self, name: str) -> Sampler:
        dataset = self.datasets[name]
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size == 1:
            return SequentialSampler(dataset)
        if len(dataset) < world_size:
            raise InputError(f"split {name!r} has {len(dataset)} samples, fewer than the {world_size} processes")
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=world_size, rank=self.trainer.global_rank, shuffle=False
        )
