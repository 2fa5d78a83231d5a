"""Unlabelled images, for ``predict``: an image folder (flat, or nested without class meaning: every image file in
it, DICOM included, named by its path relative to the folder), a MedMNIST-style npz without labels (its
``{split}_images``; labels it may have are not read) and a Hugging Face dataset without a label column. Each sample is
``image``, ``label`` (its row) and ``readable``: an image that cannot be read is skipped, not fatal, and
``why_unreadable`` says why."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from tcube_lightning.data.images import DicomFiles, ImageFolder
from tcube_lightning.data.readers import (
    as_image,
    checked_images,
    dataset_folder_kind,
    image_column,
    load_hf_dataset,
    npz_arrays,
)
from tcube_lightning.errors import InputError

UNREADABLE = (InputError, OSError, ValueError)
"""How reading one image fails (a file of another format, cut short; a dataset cell that is no image)."""


class UnlabelledImages(Dataset):
    """Images by row, each with its identity (a relative path or a row number).

    Args:
        load: Row → 8-bit RGB image.
        identities: Every row's name in the tables predict writes.
        dicom: What reading the source's DICOM files applies (``images.dicom_summary``), if it has any.
    """

    def __init__(self, load: Callable[[int], Image.Image], identities: list[str], dicom: dict | None = None) -> None:
        self.load, self.identities, self.dicom = load, identities, dicom

    def __len__(self) -> int:
        return len(self.identities)

    def __getitem__(self, index: int) -> dict:
        """The image and its row, readable; or a blank image, not readable, where the image cannot be read."""
        try:
            return {"image": self.load(index), "label": index, "readable": True}
        except UNREADABLE:
            return {"image": Image.new("RGB", (1, 1)), "label": index, "readable": False}

    def why_unreadable(self, index: int) -> str:
        """Why row ``index`` cannot be read (asked again where the batch said so: cheap, and the same answer)."""
        try:
            self.load(index)
        except UNREADABLE as err:
            return str(err)
        return "could not be read when it was predicted"


def read_unlabelled(
    path: Path, split: str = "test", dicom: DicomFiles = "suffix", windowing: bool = True
) -> UnlabelledImages:
    """The unlabelled images at ``path``: an npz file, an image folder, or a Hugging Face dataset folder."""
    if path.is_dir():
        if dataset_folder_kind(path) == "imagefolder":
            folder = ImageFolder(path, labelled=False, dicom=dicom, windowing=windowing)
            return UnlabelledImages(folder.load, folder.identities, folder.dicom)
        return _hf_dataset(path, split)
    if not path.is_file():
        raise InputError(f"data file not found: {path} (expected an image folder, an npz or a Hugging Face dataset)")
    key = f"{split}_images"
    images = checked_images(path, split, npz_arrays(path, (key,))[key])
    return UnlabelledImages(lambda i: Image.fromarray(images[i]).convert("RGB"), [str(i) for i in range(len(images))])


def _hf_dataset(folder: Path, split: str) -> UnlabelledImages:
    data = load_hf_dataset(folder, split)
    column = image_column(folder, data.column_names)
    return UnlabelledImages(lambda i: as_image(data[i][column]), [str(i) for i in range(len(data))])
