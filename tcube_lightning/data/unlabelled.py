"""Unlabelled images, for ``predict``: an image folder (flat, or nested without class meaning: every image file in
it, named by its path relative to the folder), a MedMNIST-style npz without labels (its ``{split}_images``; labels
it may have are not read) and a Hugging Face dataset without a label column. Each sample is (RGB PIL image, row);
``identities`` names every row in the tables predict writes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from tcube_lightning.data.readers import (
    as_image,
    checked_images,
    dataset_folder_kind,
    image_column,
    load_hf_dataset,
    npz_arrays,
)
from tcube_lightning.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class UnlabelledImages(Dataset):
    """Images by row, each with its identity (a relative path or a row number)."""

    def __init__(self, load: Callable[[int], Image.Image], identities: list[str]) -> None:
        self.load, self.identities = load, identities

    def __len__(self) -> int:
        return len(self.identities)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index).convert("RGB"), index


def read_unlabelled(path: Path, split: str = "test") -> UnlabelledImages:
    """The unlabelled images at ``path``: an npz file, an image folder, or a Hugging Face dataset folder."""
    if path.is_dir():
        return _image_folder(path) if dataset_folder_kind(path) == "imagefolder" else _hf_dataset(path, split)
    if not path.is_file():
        raise InputError(f"data file not found: {path} (expected an image folder, an npz or a Hugging Face dataset)")
    key = f"{split}_images"
    images = checked_images(path, split, npz_arrays(path, (key,))[key])
    return UnlabelledImages(lambda i: Image.fromarray(images[i]), [str(i) for i in range(len(images))])


def _image_folder(folder: Path) -> UnlabelledImages:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or its subfolders")
    return UnlabelledImages(lambda i: Image.open(files[i]), [p.relative_to(folder).as_posix() for p in files])


def _hf_dataset(folder: Path, split: str) -> UnlabelledImages:
    data = load_hf_dataset(folder, split)
    column = image_column(folder, data.column_names)
    return UnlabelledImages(lambda i: as_image(data[i][column]), [str(i) for i in range(len(data))])
