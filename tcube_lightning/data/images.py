"""Image files as the models see them: 8-bit RGB, whatever the file held.

One rule for every format, by bit depth: 8-bit values are taken as they are; deeper ones (16-bit PNG and TIFF, 32-bit
integer or float TIFF and arrays, DICOM of more than 8 bits stored) are scaled to 8 bits from the image's own range
(its minimum to 0, its maximum to 255), never clipped. So the same 8-bit pixels read the same from a PNG and a DICOM.

- PNG, JPEG, TIFF, … through PIL;
- DICOM through pydicom, as radiology viewers display it: the modality LUT (rescale slope and intercept), then the VOI
  LUT or window (on by default: ``windowing``), MONOCHROME1 inverted (its bright is low values), then to 8 bits by
  the rule above (8 bits stored, and values still whole numbers in 0..255: as they are). A file without the 128-byte
  preamble and ``DICM`` prefix (older systems write bare data sets) is read as one. Multi-frame files and volumes are
  refused (one image per file), as are compressed pixel data without a decoder (pydicom's message names what to
  install); a DICOM file without an image (a DICOMDIR, a report) is not an image.

``ImageFolder`` reads a folder of such files, nested at any depth: for ``test`` each file's class is its first-level
subfolder (alphabetical), for ``predict`` each file is named by its path in the folder.
"""

from __future__ import annotations

import collections
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
    """The image's own range to 0..255: (x − min) · 255 / (max − min), rounded half to even; a constant image is 0.
    An image with a NaN or infinite value is refused: its range, and so every pixel, would be undefined."""
    values = values.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} of the image's {values.size} values are NaN or infinite; give finite pixel values (set "
            "what is outside the field of view to the background value)"
        )
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def as_rgb(image: Image.Image) -> Image.Image:
    """An RGB image of 8 bits per channel; high-bit-depth grayscale is scaled from its own range (``to_uint8``)."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(to_uint8(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


class NotAnImage(InputError):
    """A file that holds no image to read: not DICOM at all, or a DICOM object without pixel data."""


def dicom_pixels(path: Path, windowing: bool = True) -> np.ndarray:
    """A single-frame DICOM image as uint8 (H, W) grayscale or (H, W, 3) colour, by the steps above."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = read_dicom(path)
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
    inverted = dataset.get("PhotometricInterpretation") == "MONOCHROME1"
    if int(dataset.get("BitsStored", 16)) <= 8 and is_8_bit(values):  # as an 8-bit PNG of the same pixels reads
        return (255 - values if inverted else values).astype(np.uint8)
    try:
        return to_uint8(values.max() - values if inverted else values)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err


def is_8_bit(values: np.ndarray) -> bool:
    """Whole numbers within 0..255: 8-bit values, to be taken as they are."""
    return bool(values.min() >= 0 and values.max() <= 255 and np.array_equal(values, np.round(values)))


def read_headers(paths: list[Path]) -> dict[Path, Dataset | InputError]:
    """Each file's DICOM header (no pixel data read), or why it cannot be read as one image."""
    headers: dict[Path, Dataset | InputError] = {}
    for path in paths:
        try:
            headers[path] = read_dicom(path, header_only=True)
        except InputError as err:
            headers[path] = err
    return headers


def dicom_summary(headers: dict[Path, Dataset | InputError], windowing: bool) -> dict:
    """What reading the files of ``headers`` applies, for results.json and predictions.json: how many have a rescale, a
    VOI LUT, a window, MONOCHROME1; and, under ``unreadable``, each file that cannot be read as one image (not DICOM,
    no image, several frames) with why."""
    counts: collections.Counter = collections.Counter()
    unreadable = {str(path): str(header) for path, header in headers.items() if isinstance(header, InputError)}
    for header in headers.values():
        if isinstance(header, InputError):
            continue
        counts["rescale"] += "RescaleSlope" in header or "RescaleIntercept" in header or "ModalityLUTSequence" in header
        counts["voi_lut"] += "VOILUTSequence" in header
        counts["window"] += "WindowCenter" in header and "VOILUTSequence" not in header
        counts["monochrome1_inverted"] += header.get("PhotometricInterpretation") == "MONOCHROME1"
    steps = ["modality LUT (rescale slope and intercept)"]
    steps += ["VOI LUT or window where the file has one"] if windowing else []
    steps += ["MONOCHROME1 inverted", "8-bit values as they are, deeper ones from each image's own range to 8 bits"]
    summary = {"files": len(headers), "windowing": windowing, "steps": steps, **dict(sorted(counts.items()))}
    return summary | ({"unreadable": unreadable} if unreadable else {})


def read_dicom(path: Path, header_only: bool = False) -> Dataset:
    """A DICOM file holding one image (``header_only``: without its pixel data); a file without the preamble and
    ``DICM`` prefix is read as a bare data set. Else an error naming the file: ``NotAnImage`` for what holds no image
    (not DICOM, a DICOMDIR, a report), ``InputError`` for a multi-frame file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    bare = False
    try:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=header_only)
        except InvalidDicomError:  # no preamble and 'DICM' prefix: a bare data set, as older systems write
            bare, dataset = True, pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
            set_transfer_syntax(dataset)
    except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError) as err:
        raise NotAnImage(f"{path}: not a readable DICOM file ({err})") from err
    if "Rows" not in dataset or "Columns" not in dataset:
        if bare:
            raise NotAnImage(f"{path}: not a readable DICOM file (no 'DICM' prefix, and no image as a bare data set)")
        raise NotAnImage(f"{path}: a DICOM file without an image (a DICOMDIR, a report, …): no Rows and Columns")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise InputError(
            f"{path}: a multi-frame DICOM ({frames} frames: a cine loop, a volume or a series in one file); one image "
            "per file is read: export each frame or slice as a file of its own"
        )
    return dataset


def set_transfer_syntax(dataset: Dataset) -> None:
    """A bare data set's transfer syntax (which its pixel data needs), from the encoding pydicom read it in."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = dataset.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    dataset.file_meta = meta


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
        headers = read_headers([p for p, is_dicom in zip(self.files, self.is_dicom, strict=True) if is_dicom])
        self.left_out: dict[str, str] = {}
        """Labelled, with ``dicom: all``: the files that hold no image (a DICOMDIR, a README), left out, with why."""
        if labelled and dicom == "all":
            self.left_out = {str(p): str(e) for p, e in headers.items() if isinstance(e, NotAnImage)}
            kept = [i for i, p in enumerate(self.files) if str(p) not in self.left_out]
            self.files, self.is_dicom = [self.files[i] for i in kept], [self.is_dicom[i] for i in kept]
            self.identities, self.labels = [self.identities[i] for i in kept], self.labels[kept]
            headers = {p: h for p, h in headers.items() if str(p) not in self.left_out}
            if not self.files:
                raise InputError(f"{folder}: none of its files is an image (data.dicom all: {len(self.left_out)} read)")
        self.dicom = dicom_summary(headers, windowing) if headers else None
        """What reading the folder's DICOM files applies (None without any)."""
        if labelled and self.dicom and self.dicom.get("unreadable"):  # predict skips such files; a test split stops
            problems = list(self.dicom["unreadable"].values())
            raise InputError(problems[0] if len(problems) == 1 else f"{len(problems)} DICOM files: {problems[:3]}")
        if self.left_out:
            self.dicom = {**(self.dicom or {}), "left_out": self.left_out}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return open_image(self.files[index], self.is_dicom[index], self.windowing)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index), int(self.labels[index])
