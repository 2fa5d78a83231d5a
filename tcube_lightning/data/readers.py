"""Readers of every on-disk format a split can come in; each yields (RGB PIL image, label) samples.

- MedMNIST npz (``{flag}_{size}.npz``, keys ``{split}_images`` / ``{split}_labels``);
- MedMNIST-C pre-generated files: medmnistc's layout ``{flag}/{corruption}.npz`` (the five severities
  stacked) or the T³ authors' ``{flag}/test/{corruption}_severity_{k}.npz``;
- MedMNIST-C corruptions applied on the fly through ``medmnistc`` (seeded per sample);
- MedIMeta's layout (``info.yaml``, ``images.hdf5``, ``task_labels/``, ``splits/``), with the HDF5 file
  opened lazily in each DataLoader worker (h5py handles do not survive a fork);
- Hugging Face ``datasets`` folders (``save_to_disk`` or parquet files); image folders are ``images.ImageFolder``.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tcube_lightning.data.images import as_rgb, to_uint8
from tcube_lightning.errors import InputError

SEVERITIES = (1, 2, 3, 4, 5)


class ImageArrays(Dataset):
    """uint8 image arrays (N, H, W[, 3]) with integer labels, as RGB PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])


def read_medmnist_npz(path: str | Path, split: str = "test") -> ImageArrays:
    """One split of a MedMNIST-format npz file, checked: uint8 images (N, H, W[, 3]), labels (N,) or (N, 1)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path} (expected a MedMNIST-format npz)")
    wanted = (f"{split}_images", f"{split}_labels")
    arrays = npz_arrays(path, wanted)
    return ImageArrays(*_checked_arrays(path, split, arrays[wanted[0]], arrays[wanted[1]]))


def npz_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz file, each of them, or an error naming the file and what it holds."""
    if not zipfile.is_zipfile(path):  # NumPy would call any other bytes "pickled (object) data"
        raise InputError(f"{path}: not an npz file (a zip archive of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(path) as npz:
            present = sorted(npz.files)
            arrays = {k: npz[k] for k in keys if k in present}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise InputError(f"{path}: not a readable npz file ({err})") from err
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}; the file has {present}")
    return arrays


def checked_images(path: Path, split: str, images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, 3), at least one."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        expected = "uint8 of shape (N, H, W) or (N, H, W, 3)"
        raise InputError(f"{path}: {split}_images must be {expected}, got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise InputError(f"{path}: split {split!r} is empty")
    return images


def _checked_arrays(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = checked_images(path, split, images)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise InputError(
            f"{path}: {split}_labels must have shape (N,) or (N, 1) with N = {len(images)}, got {labels.shape}"
        )
    return images, labels  # checked to be whole numbers in range by the data module, for every format


def read_medmnistc_file(folder: str | Path, flag: str, corruption: str, severity: int) -> Dataset:
    """A pre-generated MedMNIST-C split, from medmnistc's layout or the T³ authors'."""
    folder = Path(folder)
    stacked = folder / flag / f"{corruption}.npz"
    single = folder / flag / "test" / f"{corruption}_severity_{severity}.npz"
    if single.is_file():
        return read_medmnist_npz(single, "test")
    if not stacked.is_file():
        raise InputError(
            f"MedMNIST-C split {corruption}@{severity} not found: expected {stacked} (medmnistc's layout, five "
            f"severities stacked) or {single}; or set data.corruption_source=on_the_fly"
        )
    return StackedSeverity(stacked, severity)


class StackedSeverity(Dataset):
    """One severity block of a medmnistc file (five severities stacked), with its images read lazily.

    Only the labels are read up front (to check them before any model loads). The images, large at 224
    px, are decompressed on first use; a one-file cache per process lets the five severities of one
    corruption share them, and the next corruption's file replaces them.
    """

    def __init__(self, path: Path, severity: int) -> None:
        try:
            with np.load(path) as npz:
                keys = sorted(npz.files)
                labels = npz["test_labels"] if "test_labels" in keys else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise InputError(f"{path}: not a readable npz file ({err})") from err
        if labels is None or "test_images" not in keys:
            raise InputError(f"{path}: expected keys test_images and test_labels; the file has {keys}")
        labels = labels.reshape(len(labels), -1)[:, 0].astype(np.int64)
        if len(labels) == 0 or len(labels) % len(SEVERITIES):
            raise InputError(f"{path}: {len(labels)} images cannot be five equal, non-empty severity blocks")
        n = len(labels) // len(SEVERITIES)
        self.path, self.rows = path, slice((severity - 1) * n, severity * n)
        self.labels = labels[self.rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image = _stacked_images(self.path)[self.rows][index]
        return Image.fromarray(image).convert("RGB"), int(self.labels[index])


@functools.lru_cache(maxsize=1)
def _stacked_images(path: Path) -> np.ndarray:
    return read_medmnist_npz(path, "test").images


class CorruptedOnTheFly(Dataset):
    """A MedMNIST-C corruption applied through medmnistc at load time, reproducibly.

    medmnistc draws from NumPy's global generator, so it is re-seeded before every image from
    (seed, corruption, severity, index): results do not depend on workers or processes.
    """

    def __init__(self, base: Dataset, flag: str, corruption: str, severity: int, seed: int = 0) -> None:
        corruptors = medmnistc_corruptors(flag)
        if corruption not in corruptors:
            raise InputError(
                f"data.corruptions: {corruption!r} is not a medmnistc corruption of {flag}; known: {sorted(corruptors)}"
            )
        self.base, self.corruptor, self.severity = base, corruptors[corruption], severity
        self.labels = base.labels
        self.key = [seed, sorted(corruptors).index(corruption), severity]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        if image.size != (224, 224):  # medmnistc's parameters are set for 224-px images
            image = image.resize((224, 224), Image.BICUBIC)
        np.random.seed(np.random.SeedSequence([*self.key, index]).generate_state(1)[0])
        corrupted = np.asarray(self.corruptor.apply(image, self.severity - 1), dtype=np.uint8)
        return Image.fromarray(corrupted).convert("RGB"), label


def write_npz_atomic(path: Path, dataset: Dataset) -> None:
    """Save every (image, label) of ``dataset`` as a MedMNIST-format npz (``test_`` keys), atomically."""
    images = np.stack([np.asarray(dataset[i][0], dtype=np.uint8) for i in range(len(dataset))])
    labels = np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.npz")
    np.savez_compressed(partial, test_images=images, test_labels=labels)
    os.replace(partial, path)


def medmnistc_corruptors(flag: str) -> dict:
    try:
        from medmnistc.corruptions.registry import CORRUPTIONS_DS
    except ImportError as err:
        raise InputError(
            f"data.corruption_source=on_the_fly needs medmnistc, which cannot be imported ({err}); it also "
            "needs ImageMagick's libmagickwand (Debian: libmagickwand-6.q16-6)"
        ) from err
    if flag not in CORRUPTIONS_DS:
        raise InputError(f"medmnistc defines no corruptions for {flag!r}; it does for {sorted(CORRUPTIONS_DS)}")
    return CORRUPTIONS_DS[flag]


class MedIMetaImages(Dataset):
    """One split of a MedIMeta data set and task, read from its on-disk layout."""

    def __init__(self, folder: str | Path, dataset_id: str, task: str, split: str = "test") -> None:
        import yaml

        root = Path(folder) / dataset_id
        info_path = root / "info.yaml"
        if not info_path.is_file():
            found = sorted(p.parent.name for p in Path(folder).glob("*/info.yaml")) if Path(folder).is_dir() else []
            raise InputError(
                f"MedIMeta data set {dataset_id!r} not found: expected {info_path}; found {found or 'none'}"
            )
        info = yaml.safe_load(info_path.read_text())
        tasks = {t["task_name"]: t for t in info.get("tasks", [])}
        if task not in tasks:
            raise InputError(f"{info_path}: no task {task!r}; tasks: {sorted(tasks)}")
        labels_names = tasks[task]["labels"]
        self.classnames = (
            [labels_names[i] for i in sorted(labels_names)] if isinstance(labels_names, dict) else list(labels_names)
        )
        for needed in (root / "images.hdf5", root / "task_labels" / f"{task}.npy", root / "splits" / f"{split}.txt"):
            if not needed.is_file():
                raise InputError(f"MedIMeta {dataset_id}: missing {needed}")
        labels = np.load(root / "task_labels" / f"{task}.npy")
        lines = (root / "splits" / f"{split}.txt").read_text().split()
        self.indices = [int(Path(line).stem) for line in lines]
        if not self.indices:
            raise InputError(f"MedIMeta {dataset_id}: split {split!r} is empty")
        self.labels = labels.reshape(len(labels), -1)[:, 0].astype(np.int64)[self.indices]
        self.hdf5_path = root / "images.hdf5"
        self._images = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if self._images is None:  # opened on first use, inside the worker process
            import h5py

            self._images = h5py.File(self.hdf5_path, "r")["images"]
        return Image.fromarray(self._images[self.indices[index]]).convert("RGB"), int(self.labels[index])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}


class HFImages(Dataset):
    """A Hugging Face ``datasets`` folder: saved with ``save_to_disk``, or parquet files."""

    def __init__(self, folder: str | Path, split: str = "test") -> None:
        folder = Path(folder)
        data = load_hf_dataset(folder, split)
        self.image_column = image_column(folder, data.column_names)
        self.label_column = _column(folder, data.column_names, ("label", "labels"))
        feature = data.features[self.label_column]
        self.classnames = list(feature.names) if hasattr(feature, "names") else None
        self.data, self.folder = data, folder
        self.labels = np.asarray(data[self.label_column])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.data[index]
        try:
            image = as_image(row[self.image_column])
        except InputError as err:
            raise InputError(f"{self.folder}, row {index}: {err}") from err
        return image, int(row[self.label_column])


def as_image(value: object) -> Image.Image:
    """A dataset's image cell (decoded already, or an array) as an 8-bit RGB image (``images.as_rgb``: arrays and
    images of more than 8 bits are scaled from their own range, never clipped)."""
    if isinstance(value, Image.Image):
        return as_rgb(value)
    array = np.asarray(value)
    return Image.fromarray(array if array.dtype == np.uint8 else to_uint8(array)).convert("RGB")


def load_hf_dataset(folder: Path, split: str = "test"):
    """One split of a Hugging Face ``datasets`` folder (``save_to_disk`` or parquet files), read offline; at least one
    row."""
    import datasets

    if not folder.is_dir():
        raise InputError(f"HF dataset folder not found: {folder}")
    datasets.disable_progress_bars()  # "Downloading data" bars for local files read offline
    try:
        if dataset_folder_kind(folder) == "saved":
            data = datasets.load_from_disk(str(folder))
        else:
            data = datasets.load_dataset("parquet", data_files=[str(p) for p in sorted(folder.rglob("*.parquet"))])
    except (IndexError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        # datasets raises IndexError for a saved dataset of 0 rows, EmptyDatasetError for a folder without data
        raise InputError(
            f"{folder}: split {split!r} is empty (no rows or no data files could be read: {err!r})"
        ) from err
    if isinstance(data, datasets.DatasetDict):
        if split not in data and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise InputError(f"{folder}: no split {split!r}; splits: {sorted(data)}")
        data = data[split]
    if len(data) == 0:
        raise InputError(f"{folder}: split {split!r} is empty")
    return data


def dataset_folder_kind(folder: Path) -> str:
    """How a folder is read: ``saved`` (``save_to_disk``), ``parquet`` (parquet files in it or below) or
    ``imagefolder`` (image files, ``images.ImageFolder``)."""
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return "saved"
    return "parquet" if any(folder.rglob("*.parquet")) else "imagefolder"


def image_column(folder: Path, columns: list[str]) -> str:
    return _column(folder, columns, ("image", "img", "pixel_values"))


def _column(folder: Path, columns: list[str], candidates: tuple[str, ...]) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise InputError(f"{folder}: none of the columns {list(candidates)} found; columns: {columns}")
