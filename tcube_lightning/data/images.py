"""Image files as the models see them: 8-bit RGB, whatever the file held.

- PNG, JPEG, TIFF, … through PIL; high-bit-depth grayscale (16-bit PNG and TIFF, 32-bit integer or float TIFF) is
  scaled to 8 bits from the image's own range (its minimum to 0, its maximum to 255), never clipped;
- DICOM through pydicom, as radiology viewers display it: the modality LUT (rescale slope and intercept), then the VOI
  LUT or window (on by default: ``windowing``), MONOCHROME1 inverted (its bright is low values), then the image's
  own range to 8 bits. Multi-frame files and volumes are refused (one image per file), as are compressed pixel data
  without a decoder (pydicom's message names what to install).

``ImageFolder`` reads a folder of such files, nested at any depth: for ``test`` each file's class is its first-level
subfolder (alphabetical), for ``predict`` each file is named by its path in the folder.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from torch.utils import data

from tcube_lightning.errors import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DICOM_SUFFIXES = (".dcm", ".dicom")
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
"""PIL's modes of grayscale images with more than 8 bits (16-bit PNG/TIFF, 32-bit integer and float TIFF)."""
DicomFiles = Literal["suffix", "all"]
"""Which files of an image folder are DICOM: those ending in .dcm or .dicom, or every file that is not an image of
another format (a PACS export's files often have no suffix)."""


def to_uint8(values: np.ndarray) -> np.ndarray:
    """The image's own range to 0..255: (x − min) · 255 / (max − min), rounded half to even; a constant image is 0."""
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def as_rgb(image: Image.Image) -> Image.Image:
    """An RGB image of 8 bits per channel; high-bit-depth grayscale is scaled from its own range (``to_uint8``)."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def dicom_pixels(path: Path, windowing: bool = True) -> np.ndarray:
    """A single-frame DICOM image as uint8 (H, W) grayscale or (H, W, 3) colour, by the steps above."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = _read_dicom(path, pydicom.dcmread)
    _check_one_frame(path, dataset)
    try:
        pixels = dataset.pixel_array
    except Exception as err:  # pydicom's decoders: its message says which package decodes this syntax
        syntax = dataset.file_meta.get("TransferSyntaxUID", "an unknown transfer syntax")
        name = getattr(syntax, "name", syntax)
        reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
        raise InputError(f"{path}: the pixel data ({name}) could not be decoded: {reason}") from err
    if int(dataset.get("SamplesPerPixel", 1)) == 3:  # colour: pydicom gives RGB; no LUT applies
        return pixels if pixels.dtype == np.uint8 else to_uint8(pixels)
    if pixels.ndim != 2:
        raise InputError(f"{path}: pixel data of shape {pixels.shape}; one 2-D image per file is read")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if windowing:
        values = apply_voi_lut(values, dataset)
    if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return to_uint8(values)


def dicom_summary(paths: list[Path], windowing: bool) -> dict:
    """What reading ``paths`` applies, from their headers (no pixel data read), for results.json and
    predictions.json: how many files have a rescale, a VOI LUT, a window, MONOCHROME1; and, under ``unreadable``,
    each file that cannot be read as one image (not DICOM, several frames) with why."""
    import pydicom

    counts: collections.Counter = collections.Counter()
    unreadable = {}
    for path in paths:
        try:
            header = _read_dicom(path, lambda p: pydicom.dcmread(p, stop_before_pixels=True))
            _check_one_frame(path, header)
        except InputError as err:
            unreadable[str(path)] = str(err)
            continue
        counts["rescale"] += "RescaleSlope" in header or "RescaleIntercept" in header or "ModalityLUTSequence" in header
        counts["voi_lut"] += "VOILUTSequence" in header
        counts["window"] += "WindowCenter" in header and "VOILUTSequence" not in header
        counts["monochrome1_inverted"] += header.get("PhotometricInterpretation") == "MONOCHROME1"
    steps = ["modality LUT (rescale slope and intercept)"]
    steps += ["VOI LUT or window where the file has one"] if windowing else []
    steps += ["MONOCHROME1 inverted", "each image's own range to 8 bits"]
    summary = {"files": len(paths), "windowing": windowing, "steps": steps, **dict(sorted(counts.items()))}
    return summary | ({"unreadable": unreadable} if unreadable else {})


def _read_dicom(path: Path, read: Callable[[Path], Dataset]) -> Dataset:
    from pydicom.errors import InvalidDicomError

    try:
        return read(path)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as err:
        raise InputError(f"{path}: not a readable DICOM file ({err})") from err


def _check_one_frame(path: Path, dataset: Dataset) -> None:
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(
            f"{path}: a multi-frame DICOM ({frames} frames: a cine loop, a volume or a series in one file); one image "
            "per file is read: export each frame or slice as a file of its own"
        )


def open_image(path: Path, dicom: bool, windowing: bool) -> Image.Image:
    """One file as an 8-bit RGB image, or an error naming the file."""
    if dicom:
        return Image.fromarray(dicom_pixels(path, windowing)).convert("RGB")
    try:
        with Image.open(path) as image:
            image.load()
            return as_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: cannot be read as an image ({err})") from err


class ImageFolder(data.Dataset):
    """Image files under ``folder`` (and its ``split`` subfolder, if it has one), nested at any depth, in path order.

    Args:
        folder: The folder.
        labelled: Each file's class is its first-level subfolder, the classes in alphabetical order (``test``);
            otherwise files are named by their path in the folder and not labelled (``predict``).
        dicom: Which files are DICOM (``DicomFiles``).
        windowing: Apply DICOM files' VOI LUT or window.
        split: A subfolder of this name, if there is one, is read instead of the whole folder (a labelled image
            folder with train/test subfolders).
    """

    def __init__(
        self,
        folder: Path,
        labelled: bool,
        dicom: DicomFiles = "suffix",
        windowing: bool = True,
        split: str | None = None,
    ) -> None:
        self.root = folder / split if split is not None and (folder / split).is_dir() else folder
        known = IMAGE_SUFFIXES + DICOM_SUFFIXES
        self.files = sorted(
            p
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and (dicom == "all" or p.suffix.lower() in known)
        )
        if not self.files:
            what = "files" if dicom == "all" else f"image files ({', '.join(known)})"
            raise InputError(f"{folder}: no {what} in it or its subfolders")
        self.is_dicom = [
            p.suffix.lower() in DICOM_SUFFIXES or p.suffix.lower() not in IMAGE_SUFFIXES for p in self.files
        ]
        self.windowing = windowing
        self.identities = [p.relative_to(self.root).as_posix() for p in self.files]
        self.classnames: list[str] | None = None
        if labelled:
            loose = [name for name in self.identities if "/" not in name]
            if loose:
                raise InputError(
                    f"{folder}: {loose[:3]} are not in a class subfolder; a labelled image folder holds one subfolder "
                    "per class"
                )
            self.classnames = sorted({name.split("/", 1)[0] for name in self.identities})
            self.labels = np.asarray([self.classnames.index(name.split("/", 1)[0]) for name in self.identities])
        dicom_files = [p for p, is_dicom in zip(self.files, self.is_dicom) if is_dicom]
        self.dicom = dicom_summary(dicom_files, windowing) if dicom_files else None
        """What reading the folder's DICOM files applies (None without any)."""
        if labelled and self.dicom and self.dicom.get("unreadable"):  # predict skips such files; a test split stops
            problems = list(self.dicom["unreadable"].values())
            raise InputError(problems[0] if len(problems) == 1 else f"{len(problems)} DICOM files: {problems[:3]}")

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return open_image(self.files[index], self.is_dicom[index], self.windowing)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.labels[index])
