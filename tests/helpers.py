"""Helpers shared by the test files (no test file imports another): the tiny model and data writers, the command
line run in-process or in a subprocess, independent open_clip oracles, and the numeric tolerances."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tcube_lightning import loading  # noqa: F401 - registers the tiny architecture
from tcube_lightning.cli.app import main

# ---------------------------------------------------------------------------------------------------- tolerances
# float32 rounds each operation to a relative error of at most EPS32. A network output compounds that over its
# sequential stages: for the tiny CLIP (2 blocks per tower) embedding, pre-norm, 2 × (layer norm, attention,
# residual, layer norm, MLP, residual), final norm, pooling, projection and normalisation is about 16. Two
# computations of one quantity in a different order (merged weights vs merged activations, lerp vs
# (1 − w)·a + w·b, another BLAS blocking or thread count) may therefore differ by DEPTH · EPS32 · |magnitude|.
EPS32 = torch.finfo(torch.float32).eps
DEPTH = 16
LOGIT_SCALE = 100.0
"""The tiny models' logit scale, CLIP's trained value: logits are 100 × a cosine."""


def rounding_atol(magnitude: float, dtype: torch.dtype = torch.float32, depth: int = DEPTH) -> float:
    """Absolute tolerance for two computations, in ``dtype``, of a quantity of the given magnitude (for the
    coefficient maths: the magnitude of the logits it starts from)."""
    return depth * torch.finfo(dtype).eps * magnitude


def k_experts_atol(one_expert_atol: float, count: int) -> float:
    """A merge of ``count`` task vectors against one expert's tolerance: each merged value (or leaf output) is a sum
    of count + 1 terms of its magnitude where one expert's lerp has two."""
    return (count + 1) / 2 * one_expert_atol


def sum_atol(reference: torch.Tensor, terms: int) -> float:
    """A float32 sum of ``terms`` terms of about ``reference``'s magnitude (at least 1): one rounding each (merged
    parameters against state_dict arithmetic in float64)."""
    return terms * EPS32 * max(float(reference.abs().max()), 1.0)


EMBEDDING_ATOL = rounding_atol(1.0)
"""Unit-norm image or text embeddings, and zero-shot heads."""
LOGITS_ATOL = rounding_atol(LOGIT_SCALE)
"""Zero-shot logits: LOGIT_SCALE × a cosine."""
FRACTION_ATOL = EPS32
"""A count divided by a count in float32 (torchmetrics' accuracies): one rounding."""
JS_ATOL = 2 * LOGITS_ATOL
"""JS (and entropies) from two models' float32 logits: a log-softmax moves by at most twice the largest change
of a logit, and JS is a mean of log-probability differences weighted by probabilities."""


def lambda_atol(gamma: float, lambda_range: float = 1.0, logits_atol: float = LOGITS_ATOL) -> float:
    """λ = λ_min + range · σ(γ·JS): σ' ≤ 1/4, so λ moves by at most range · γ/4 times JS's error (twice the logits')."""
    return lambda_range * gamma / 4 * 2 * logits_atol


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


def write_medmnist_npz(path: Path, n: int, num_classes: int, size: int = 28, rgb: bool = True, seed: int = 0) -> None:
    """A MedMNIST-format npz with the official keys and dtypes (uint8 images, uint8 (N, 1) labels)."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    arrays = {}
    for split, count in (("train", 4), ("val", 4), ("test", n)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape[1:]), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, num_classes, (count, 1), dtype=np.uint8)
    np.savez_compressed(path, **arrays)


def random_sample_table(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A split's per-sample analysis columns (``samples.py``), random: three classes, the pretrained model right
    about 60 % of the time and the expert about half (every decision quadrant populated), DaWin's ratio correlated
    with JS but not exactly, a flip for about one sample in ten."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, count)
    js = (rng.random(count) * np.log(2)).astype(np.float32)
    return {
        "index": np.arange(count),
        "label": label,
        "js": js,
        "lambda": rng.random(count),
        "w/t3": rng.random(count),
        "w/dawin": (0.3 * js + 0.2 * rng.random(count)).astype(np.float32),
        "w/xent": rng.random(count),
        "w/maxconf": rng.random(count),
        "pred/zeroshot": np.where(rng.random(count) < 0.6, label, (label + 1) % 3),
        "prob/zeroshot": rng.random(count),
        "pred/expert": np.where(rng.random(count) < 0.5, label, (label + 2) % 3),
        "prob/expert": rng.random(count),
        "flip": rng.random(count) < 0.1,
    }


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
        "id": dataset_id,
        "name": dataset_id.upper(),
        "domain": "test",
        "input_size": [3, size, size],
        "tasks": [
            {"task_name": task, "task_target": "MULTICLASS_CLASSIFICATION", "labels": dict(enumerate(classnames))}
        ],
    }
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


REPO = Path(__file__).resolve().parents[1]
SPLITS = {"a": "tiny_a.npz", "b": "tiny_b.npz"}
GAMMA = 20.0  # spreads λ widely on the tiny pair, so that sample-wise T³ is really tested


def cli_args(clip_pair, npz_root, out, *extra):
    return [
        "test",
        f"--model.arch={ARCH}",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        f"--data.root={npz_root}",
        f"--data.sources={json.dumps(SPLITS)}",
        f"--data.classnames={json.dumps(CLASSNAMES)}",
        f"--data.templates={json.dumps(TEMPLATES)}",
        "--data.image_size=28",
        f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--seed_everything=0",
        "--model.plots=false",  # figures cost about a second per split: drawn only where a test looks at them
        *extra,
    ]


def run_cli_in_process(args):
    """The command line in this process; returns results.json, read back, and the run's folder (the one
    ``--model.results_dir`` names, else the only one under ``--trainer.default_root_dir``)."""
    main(args)
    options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    if "--model.results_dir" in options:
        results = Path(options["--model.results_dir"]) / "results.json"
    else:
        (results,) = Path(options["--trainer.default_root_dir"]).rglob("results.json")
    return json.loads(results.read_text()), results.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a command run in a fresh process: the Hugging Face libraries offline, as in this session."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def oracle_model(pt_sd: dict, ft_sd: dict, w: float, arch: str = ARCH, reuse: bool = False) -> torch.nn.Module:
    """An open_clip model loaded from (1 − w)·θ_pt + w·θ_ft, the state_dict arithmetic written out by hand: a fresh
    one, or with ``reuse`` one kept per architecture (for immediate use: the next such call reloads it; creating
    a model costs three times its forward)."""
    model = _reused_model(arch) if reuse else open_clip.create_model(arch).eval()
    merged = {k: (1 - w) * pt_sd[k] + w * ft_sd[k] if pt_sd[k].is_floating_point() else pt_sd[k] for k in pt_sd}
    model.load_state_dict(merged)
    return model


@functools.cache
def _reused_model(arch: str) -> torch.nn.Module:
    return open_clip.create_model(arch).eval()


def oracle_logits(
    pt_sd: dict, ft_sd: dict, w: float, images: torch.Tensor, tokens: torch.Tensor, text_model=None
) -> torch.Tensor:
    """Zero-shot logits of ``oracle_model``; the class embeddings from ``text_model``'s text tower if given."""
    model = oracle_model(pt_sd, ft_sd, w, reuse=True)
    with torch.no_grad():
        text = (text_model or model).encode_text(tokens, normalize=True)
        text = text.reshape(len(CLASSNAMES), len(TEMPLATES), -1).mean(1)
        text = text / text.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * model.encode_image(images, normalize=True) @ text.T


def oracle_predictions(clip_pair, npz_root, split_file, weights, merge_text=True, mean=None, std=None):
    """Oracle logits (NumPy) of every sample of a split for each weight, and the split's labels. Without
    ``merge_text`` the class embeddings come from the pretrained model's text tower."""
    raw = np.load(npz_root / split_file)
    transform = open_clip.image_transform(28, is_train=False, mean=mean, std=std)
    images = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in raw["test_images"]])
    tokens = open_clip.get_tokenizer(ARCH)([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    pt_sd, ft_sd = (torch.load(p, weights_only=True) for p in clip_pair)
    text_model = None if merge_text else oracle_model(pt_sd, ft_sd, 0.0)
    logits = {w: oracle_logits(pt_sd, ft_sd, w, images, tokens, text_model).numpy() for w in sorted(set(weights))}
    return logits, raw["test_labels"][:, 0]


# ---------------------------------------------------------------------------------------- the documentation's commands
NEEDS = "# needs:"
"""A block's marker: its commands need what follows (real weights, data, GPUs, Docker) and are not run here."""


def shell_blocks(path: Path) -> list[tuple[bool, list[str]]]:
    """Each bash block of a page: whether it is marked with ``NEEDS``, and its commands (continuation lines joined,
    comments dropped)."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            command = " ".join(line.split(" #")[0].split())
            if command and not command.startswith("#"):
                commands.append(command)
        blocks.append((NEEDS in block, commands))
    return blocks


def cli_arguments(command: str) -> list[str] | None:
    """The arguments a command hands to main.py (directly, through srun, or as the Docker image's entrypoint)."""
    words = shlex.split(command)
    for start, word in enumerate(words):
        if word.endswith("main.py"):
            return words[start + 1 :]
    if words[:2] == ["docker", "run"]:
        return words[words.index("tcube-lightning") + 1 :]
    return None


def load_benchmark(name: str = "bench_merging"):
    """benchmarks/<name>.py as a module, to call its ``main`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli_expecting_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """The command line, in-process, on bad input: it must stop with exit status 2 (no other exception); returns
    what it printed on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------- DICOM
def write_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: tuple[int, np.ndarray] | None = None,
    frames: int = 1,
    transfer_syntax: str | None = None,
    bits: int = 16,
    bare: bool = False,
) -> Path:
    """A DICOM file written by pydicom: unsigned grayscale ``pixels`` (H, W) of ``bits`` (16 or 8) bits (repeated
    ``frames`` times), with a rescale (slope, intercept), a window (center, width) or a VOI LUT (first mapped value,
    table) if given. A ``transfer_syntax`` other than explicit little endian gets bytes no decoder can read (a
    compressed file whose decoder is missing). ``bare``: the data set alone, without the 128-byte preamble, the
    ``DICM`` prefix and the file meta information, as older systems write."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "tcube-test"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = rescale[0], rescale[1], "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        first, table = voi_lut
        item = pydicom.Dataset()
        item.LUTDescriptor = [len(table), first, 16]
        item.add_new("LUTData", "US", [int(v) for v in table])
        ds.VOILUTSequence = [item]
    if transfer_syntax is None:
        ds.PixelData = np.tile(pixels.astype(np.uint16 if bits == 16 else np.uint8), (frames, 1, 1)).tobytes()
    else:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8 not a decodable stream \xff\xd9" for _ in range(frames)])
        ds["PixelData"].VR = "OB"
    if bare:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
        assert path.read_bytes()[128:132] != b"DICM"
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------------- interruptions
def interrupt_in_split(monkeypatch: pytest.MonkeyPatch, split: str, step: str = "test_step") -> None:
    """A real SIGINT to this process right after the first batch of ``split`` (Ctrl+C), through the module's
    ``step``; ``monkeypatch.undo`` lets the next run go through."""
    from tcube_lightning.evaluation.module import TCubeModule

    original = getattr(TCubeModule, step)

    def interrupted(self, batch, batch_idx, dataloader_idx=0):
        original(self, batch, batch_idx, dataloader_idx)  # its first batch finishes the splits before it
        if self.split_names[dataloader_idx] == split:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TCubeModule, step, interrupted)


ONE_FULL_EXPERT = "leaf-wise, weights merged per row in leaves of at least 48 tokens per row"
"""results.json's per-sample pass with one full expert (``engine.row_merge.min_tokens``)."""
