"""Reading MedMNIST-format npz files into CLIP-preprocessed batches, and rejecting malformed ones."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from helpers import CLASSNAMES, write_medmnist_npz
from tcube_lightning.data.datamodule import EvaluationDataModule
from tcube_lightning.data.modalities import medmnist_classnames, medmnist_filename
from tcube_lightning.data.readers import read_medmnist_npz
from tcube_lightning.errors import InputError


def test_official_file_names():
    assert medmnist_filename("bloodmnist") == "bloodmnist.npz"
    assert medmnist_filename("bloodmnist", 224) == "bloodmnist_224.npz"


def test_class_names_come_from_medmnist_info():
    names = medmnist_classnames("pneumoniamnist")
    assert names == ["normal", "pneumonia"]
    assert len(medmnist_classnames("bloodmnist")) == 8
    with pytest.raises(InputError, match=r"unknown MedMNIST dataset 'nosuchmnist'"):
        medmnist_classnames("nosuchmnist")


@pytest.mark.parametrize("size,rgb", [(28, False), (224, True)])
def test_datamodule_yields_clip_preprocessed_batches(tmp_path, size, rgb):
    write_medmnist_npz(tmp_path / medmnist_filename("tinymnist", size), 10, 4, size=size, rgb=rgb)
    data = EvaluationDataModule(
        root=str(tmp_path),
        sources={"in_domain": medmnist_filename("tinymnist", size)},
        classnames=CLASSNAMES,
        image_size=size,
        batch_size=4,
    )
    data.setup("test")
    (loader,) = data.test_dataloader()
    batch = next(iter(loader))
    images, labels = batch["image"], batch["label"]
    assert images.shape == (4, 3, size, size) and images.dtype == torch.float32
    raw = np.load(tmp_path / medmnist_filename("tinymnist", size))
    np.testing.assert_array_equal(labels.numpy(), raw["test_labels"][:4, 0])
    # Independent oracle: open_clip's own preprocessing of the first image, converted to RGB by PIL.
    expected = open_clip.image_transform(size, is_train=False)(Image.fromarray(raw["test_images"][0]).convert("RGB"))
    torch.testing.assert_close(images[0], expected)
    assert [len(dl.dataset) for dl in data.test_dataloader()] == [10]


def test_missing_file_names_the_expected_path(tmp_path):
    data = EvaluationDataModule(root=str(tmp_path), sources={"x": "bloodmnist_224.npz"}, classnames=CLASSNAMES)
    with pytest.raises(InputError, match=r"data file not found: .*bloodmnist_224\.npz"):
        data.setup("test")


def test_missing_key_is_reported(tmp_path):
    np.savez(tmp_path / "bad.npz", val_images=np.zeros((2, 28, 28), np.uint8), val_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(InputError, match=r"missing key\(s\) \['test_images', 'test_labels'\]"):
        read_medmnist_npz(tmp_path / "bad.npz")


def test_wrong_dtype_is_reported(tmp_path):
    np.savez(
        tmp_path / "bad.npz", test_images=np.zeros((2, 28, 28), np.float32), test_labels=np.zeros((2, 1), np.uint8)
    )
    with pytest.raises(InputError, match=r"must be uint8 of shape"):
        read_medmnist_npz(tmp_path / "bad.npz")


def test_labels_out_of_range_are_reported(tmp_path):
    write_medmnist_npz(tmp_path / "six.npz", 12, 6)
    data = EvaluationDataModule(root=str(tmp_path), sources={"x": "six.npz"}, classnames=CLASSNAMES)
    with pytest.raises(InputError, match=r"label\(s\) outside 0..3 for 4 class names"):
        data.setup("test")


def test_corrupt_file_is_reported(tmp_path):
    import zipfile

    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(InputError, match=r"broken.npz: not an npz file"):
        read_medmnist_npz(tmp_path / "broken.npz")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as archive:  # a zip archive, but no .npy array in it
        archive.writestr("test_images.npy", b"\x93NUMPY cut short")
        archive.writestr("test_labels.npy", b"")
    with pytest.raises(InputError, match=r"cut.npz: not a readable npz"):
        read_medmnist_npz(tmp_path / "cut.npz")
