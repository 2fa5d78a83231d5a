"""Image files as the models see them, against NumPy computations of the same steps: high-bit-depth images scaled from
their own range, DICOM through its modality LUT, window or VOI LUT and MONOCHROME1 inversion; what cannot be read is
named."""

from contextlib import nullcontext

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEGLosslessSV1

from helpers import CLASSNAMES, cli_args, run_cli_in_process, write_dicom
from tcube_lightning.data.images import ImageFolder, as_rgb, dicom_pixels, dicom_summary, open_image, read_headers
from tcube_lightning.errors import InputError

RAW = np.random.default_rng(0).integers(200, 3800, size=(12, 10)).astype(np.uint16)
"""12-bit values stored in 16 bits, as X-ray detectors write them."""


def numpy_uint8(values: np.ndarray) -> np.ndarray:
    """The image's own range to 0..255, rounded half to even."""
    values = values.astype(np.float64)
    return np.round((values - values.min()) * 255.0 / (values.max() - values.min())).astype(np.uint8)


def numpy_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, linear window, output 0..1."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((x - (center - 0.5)) / (width - 1) + 0.5).clip(0, 1)
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, inside))


def gray(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image)
    assert image.mode == "RGB" and (rgb == rgb[..., :1]).all()
    return rgb[..., 0]


def test_sixteen_bit_and_float_images_are_scaled_from_their_own_range_never_clipped(tmp_path):
    Image.fromarray(RAW).save(tmp_path / "x.png")  # a 16-bit grayscale PNG
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode.startswith("I")
    np.testing.assert_array_equal(gray(open_image(tmp_path / "x.png", dicom=False, windowing=True)), numpy_uint8(RAW))
    as_float = RAW.astype(np.float32) / 7.0
    Image.fromarray(as_float).save(tmp_path / "x.tif")  # a 32-bit float TIFF
    np.testing.assert_array_equal(gray(open_image(tmp_path / "x.tif", False, True)), numpy_uint8(as_float))
    eight_bit = (RAW // 16).astype(np.uint8)  # 8-bit images are as they were
    np.testing.assert_array_equal(gray(as_rgb(Image.fromarray(eight_bit))), eight_bit)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_modality_lut_window_and_monochrome1_as_numpy_computes_them(tmp_path, photometric):
    slope, intercept, center, width = 2.0, -1000.0, 2600.0, 3000.0
    path = write_dicom(tmp_path / "x.dcm", RAW, photometric, rescale=(slope, intercept), window=(center, width))
    windowed = numpy_window(RAW * slope + intercept, center, width)
    expected = numpy_uint8(windowed.max() - windowed if photometric == "MONOCHROME1" else windowed)
    np.testing.assert_array_equal(dicom_pixels(path), expected)
    assert (windowed == 0).sum() > 0 and (windowed == 1).sum() > 0  # the window really clips at both ends
    modality_only = RAW * slope + intercept  # windowing off: the modality values' whole range
    expected = numpy_uint8(modality_only.max() - modality_only if photometric == "MONOCHROME1" else modality_only)
    np.testing.assert_array_equal(dicom_pixels(path, windowing=False), expected)


def test_a_dicom_voi_lut_is_applied_before_a_window(tmp_path):
    first, table = 500, np.linspace(0, 4000, 2000).astype(np.uint16) ** 1  # entries for 500..2499
    path = write_dicom(tmp_path / "x.dcm", RAW, voi_lut=(first, table), window=(1000.0, 10.0))
    looked_up = table[np.clip(RAW.astype(int) - first, 0, len(table) - 1)]
    np.testing.assert_array_equal(dicom_pixels(path), numpy_uint8(looked_up))
    plain = write_dicom(tmp_path / "plain.dcm", RAW)  # no rescale, no window: the stored values' range
    np.testing.assert_array_equal(dicom_pixels(plain), numpy_uint8(RAW))
    summary = dicom_summary(read_headers([path, plain]), windowing=True)
    assert (summary["files"], summary["voi_lut"], summary["window"], summary["rescale"]) == (2, 1, 0, 0)


def test_what_cannot_be_read_as_one_image_is_named(tmp_path):
    frames = write_dicom(tmp_path / "cine.dcm", RAW, frames=3)
    with pytest.raises(InputError, match=r"cine.dcm: a multi-frame DICOM \(3 frames"):
        dicom_pixels(frames)
    unreadable = dicom_summary(read_headers([frames]), windowing=True)[
        "unreadable"
    ]  # said from the header, no pixel read
    assert "a multi-frame DICOM (3 frames" in unreadable[str(frames)]
    (tmp_path / "labelled" / "a").mkdir(parents=True)
    write_dicom(tmp_path / "labelled" / "a" / "cine.dcm", RAW, frames=3)
    with pytest.raises(InputError, match=r"cine.dcm: a multi-frame DICOM"):  # a test split stops before evaluating
        ImageFolder(tmp_path / "labelled", labelled=True)
    compressed = write_dicom(tmp_path / "jpeg.dcm", RAW, transfer_syntax=JPEGLosslessSV1)
    with pytest.raises(InputError, match=r"jpeg.dcm: the pixel data \(JPEG Lossless.*could not be decoded.*pylibjpeg"):
        dicom_pixels(compressed)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(InputError, match=r"junk.dcm: not a readable DICOM file"):
        dicom_pixels(tmp_path / "junk.dcm")
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(InputError, match=r"cut.png: cannot be read as an image"):
        open_image(tmp_path / "cut.png", dicom=False, windowing=True)


def test_an_image_folder_reads_dicom_by_suffix_or_every_file_and_labels_by_subfolder(tmp_path):
    for i, name in enumerate(["b/x.dcm", "a/nested/y.png", "b/IM0001"]):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            Image.fromarray(RAW).save(tmp_path / name)
        else:
            write_dicom(tmp_path / name, RAW + i)
    by_suffix = ImageFolder(tmp_path, labelled=True)
    assert by_suffix.identities == ["a/nested/y.png", "b/x.dcm"] and by_suffix.classnames == ["a", "b"]
    assert list(by_suffix.labels) == [0, 1] and by_suffix.dicom["files"] == 1
    every = ImageFolder(tmp_path, labelled=True, dicom="all")
    assert every.identities == ["a/nested/y.png", "b/IM0001", "b/x.dcm"] and every.dicom["files"] == 2
    for index in range(3):
        np.testing.assert_array_equal(gray(every[index][0]), numpy_uint8(RAW))  # each image's own range
    Image.fromarray(RAW).save(tmp_path / "loose.png")
    with pytest.raises(InputError, match=r"\['loose.png'\] are not in a class subfolder"):
        ImageFolder(tmp_path, labelled=True)


def test_sixteen_bit_pngs_and_dicom_files_score_what_their_eight_bit_images_score(clip_pair, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = 0, 255  # each image spans 0..255: its own range is the 8-bit one
    for i, image in enumerate(images):
        for kind, write in (
            ("eight", lambda path, im=image: Image.fromarray(im).save(path.with_suffix(".png"))),
            (
                "sixteen",
                lambda path, im=image: Image.fromarray(im.astype(np.uint16) * 257).save(path.with_suffix(".png")),
            ),
            ("dicom", lambda path, im=image: write_dicom(path.with_suffix(".dcm"), im.astype(np.uint16) * 257)),
        ):
            path = tmp_path / kind / CLASSNAMES[i % len(CLASSNAMES)] / f"{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
    results = {}
    for kind in ("eight", "sixteen", "dicom"):
        args = [
            a
            for a in cli_args(clip_pair, tmp_path, tmp_path / kind / "run", "--model.methods=[zeroshot, t3]")
            if not a.startswith(("--data.sources", "--data.classnames"))
        ]
        results[kind], _ = run_cli_in_process([*args, f'--data.sources={{"s": "{kind}"}}'])
    assert results["sixteen"]["metrics"] == results["eight"]["metrics"] == results["dicom"]["metrics"]
    assert results["dicom"]["dicom"]["s"]["files"] == 12 and "dicom" not in results["eight"]


def test_dark_eight_bit_dicom_files_without_preamble_score_what_their_pngs_score(clip_pair, tmp_path):
    """The same 8-bit pixels, not spanning 0..255, as PNG files and as bare 8-bit DICOM files without a suffix, read
    with --data.dicom all beside a README and a DICOMDIR-like file: the same results, the non-images left out."""
    images = np.random.default_rng(2).integers(20, 120, size=(8, 28, 28), dtype=np.uint8)
    for i, image in enumerate(images):
        label = CLASSNAMES[i % len(CLASSNAMES)]
        for kind in ("png", "dicom"):
            (tmp_path / kind / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "png" / label / f"{i}.png")
        write_dicom(tmp_path / "dicom" / label / f"IM{i:04d}", image, bits=8, bare=True)
    (tmp_path / "dicom" / CLASSNAMES[0] / "README.txt").write_text("exported by the PACS\n" * 4)
    results = {}
    for kind, extra in (("png", []), ("dicom", ["--data.dicom=all"])):
        args = [
            a
            for a in cli_args(clip_pair, tmp_path, tmp_path / f"run_{kind}", "--model.methods=[zeroshot, t3]", *extra)
            if not a.startswith(("--data.sources", "--data.classnames"))
        ]
        with pytest.warns(UserWarning, match="hold no image and are left out") if kind == "dicom" else nullcontext():
            results[kind], _ = run_cli_in_process([*args, f'--data.sources={{"s": "{kind}"}}'])
    assert results["png"]["metrics"] == results["dicom"]["metrics"]
    record = results["dicom"]["dicom"]["s"]
    assert record["files"] == 8 and list(record["left_out"]) == [str(tmp_path / "dicom" / CLASSNAMES[0] / "README.txt")]


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_the_same_eight_bit_pixels_read_the_same_from_a_png_and_a_dicom(tmp_path, photometric):
    """One rule by bit depth: 8-bit values as they are, in every format (a dark image is not stretched)."""
    dark = np.random.default_rng(1).integers(10, 90, size=(12, 10)).astype(np.uint8)
    Image.fromarray(dark).save(tmp_path / "x.png")
    path = write_dicom(tmp_path / "x.dcm", dark, photometric, bits=8)
    expected = 255 - dark if photometric == "MONOCHROME1" else dark  # MONOCHROME1: bright is low
    np.testing.assert_array_equal(dicom_pixels(path), expected)
    if photometric == "MONOCHROME2":
        np.testing.assert_array_equal(
            gray(open_image(path, True, True)), gray(open_image(tmp_path / "x.png", False, True))
        )
    rescaled = write_dicom(tmp_path / "r.dcm", dark, photometric, bits=8, rescale=(4.0, -100.0))  # leaves 0..255
    values = dark * 4.0 - 100.0
    np.testing.assert_array_equal(
        dicom_pixels(rescaled), numpy_uint8(values.max() - values if photometric == "MONOCHROME1" else values)
    )


def test_a_dicom_file_without_its_preamble_reads_as_the_same_image(tmp_path):
    whole = write_dicom(tmp_path / "whole.dcm", RAW, window=(2000.0, 3000.0))
    bare = write_dicom(tmp_path / "IM0001", RAW, window=(2000.0, 3000.0), bare=True)
    np.testing.assert_array_equal(dicom_pixels(bare), dicom_pixels(whole))


def test_non_finite_pixels_are_refused_naming_the_file(tmp_path):
    values = RAW.astype(np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(InputError, match=r"nan.tif: cannot be read as an image \(1 of the image's 120 values are NaN"):
        open_image(tmp_path / "nan.tif", False, True)


def test_with_dicom_all_a_labelled_folder_leaves_out_files_that_hold_no_image(tmp_path):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        write_dicom(tmp_path / label / "IM0001", RAW)
    (tmp_path / "a" / "README.txt").write_text("exported by the PACS\n" * 4)
    directory = pydicom.Dataset()  # a DICOMDIR: DICOM, and no image
    directory.file_meta = FileMetaDataset()
    directory.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    directory.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    directory.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    directory.FileSetID = "EXPORT"
    directory.save_as(tmp_path / "b" / "DICOMDIR", enforce_file_format=True)
    folder = ImageFolder(tmp_path, labelled=True, dicom="all")
    assert folder.identities == ["a/IM0001", "b/IM0001"] and folder.labels.tolist() == [0, 1]
    assert sorted(folder.left_out) == [str(tmp_path / "a" / "README.txt"), str(tmp_path / "b" / "DICOMDIR")]
    assert "a DICOM file without an image" in folder.left_out[str(tmp_path / "b" / "DICOMDIR")]
    assert folder.dicom["left_out"] == folder.left_out and folder.dicom["files"] == 2
    with pytest.raises(InputError, match="not a readable DICOM file"):  # named as DICOM by its suffix: an error
        (tmp_path / "a" / "notes.dcm").write_text("not DICOM")
        ImageFolder(tmp_path, labelled=True, dicom="suffix")
