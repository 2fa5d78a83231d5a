"""The LightningDataModule: every test split of a modality (or of the user's own files), CLIP-preprocessed."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import open_clip
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler

from tcube_lightning.data.calibration import CALIBRATION, VAL, held_out, split_rows
from tcube_lightning.data.checks import check_classnames, check_labels, check_template, raise_problems
from tcube_lightning.data.images import DicomFiles, ImageFolder
from tcube_lightning.data.mixing import build_mixes, domain_experts
from tcube_lightning.data.modalities import (
    get_modality,
    known_corruptions,
    medmnist_classnames,
    medmnist_filename,
    modality_corruptions,
)
from tcube_lightning.data.readers import (
    SEVERITIES,
    CorruptedOnTheFly,
    HFImages,
    MedIMetaImages,
    dataset_folder_kind,
    read_medmnist_npz,
    read_medmnistc_file,
    write_npz_atomic,
)
from tcube_lightning.data.sampling import WholeBatchSampler, leave_sigterm_to_the_main_process
from tcube_lightning.data.splitnames import corrupted_split_name
from tcube_lightning.data.unlabelled import read_unlabelled
from tcube_lightning.errors import InputError

SPLIT_KINDS = ("in_domain", "base_to_novel", "corrupted")


TEST_ONLY = ("mixes", "expert_of")
"""Settings of labelled evaluation that ``predict`` leaves aside, so that it takes a test config as it is."""


class Preprocessed(Dataset):
    """A reader's samples through the CLIP preprocessing transform, as the batches' fields: ``image`` and ``label``
    from a (PIL image, label) pair, or a reader's own fields (``UnlabelledImages``: ``readable`` too)."""

    def __init__(self, base: Dataset, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        sample = dict(zip(("image", "label"), sample)) if isinstance(sample, tuple) else dict(sample)
        sample["image"] = self.transform(sample["image"])
        return sample


class EvaluationDataModule(L.LightningDataModule):
    """Named test splits, one test dataloader each.

    With a ``modality`` the splits follow the evaluation protocol, read from under ``root``:
    ``in_domain`` (``{flag}_{size}.npz``), ``base_to_novel`` (``medimeta/{dataset}/``) and one split
    ``{corruption}@{severity}`` per MedMNIST-C corruption and severity (``medmnistc/{flag}/...`` or
    generated on the fly). ``sources`` overrides where a split is read from, or adds splits of your own:
    an ``.npz`` path is read as MedMNIST npz, a folder as a Hugging Face dataset.

    Args:
        root: Folder the data paths are relative to.
        modality: One of the registered modalities (blood, breast, retina, oct, pneumonia), or several, e.g.
            ``[blood, breast, retina, oct]`` (a run with several experts): each modality's splits are then named
            after it, ``blood_in_domain``, ``blood_base_to_novel``, ``blood_pixelate@3``, each with that modality's
            class names and prompt templates.
        splits: Which kinds of split to evaluate: in_domain, base_to_novel, corrupted (default: all).
        sources: Split name → npz file or HF dataset folder (relative to root), e.g. ``{in_domain: x.npz}``.
        corruptions: MedMNIST-C corruptions to evaluate (default: the modality's list).
        severities: Corruption severities, each in 1..5.
        corruption_source: ``files`` (pre-generated MedMNIST-C npz) or ``on_the_fly`` (medmnistc, seeded).
        size: Image size of the MedMNIST file to read (28, 64, 128 or 224).
        flag: MedMNIST flag for the class names when there is no modality.
        classnames: Class names in label order for the non-MedIMeta splits (default: medmnist.INFO's). A Hugging
            Face source that names its classes (ClassLabel, image folder) uses its own names; given names that
            disagree with them stop the run.
        templates: Prompt templates, each with one ``{}``; default: the modality's.
        split_key: Split inside MedMNIST npz files (test, val or train); MedIMeta's split file of that name.
        image_size: Side of the CLIP input; images are resized (bicubic), center-cropped and normalised.
        mean: Per-channel mean of the normalisation; default OpenAI CLIP's. Must be what the models were
            trained with: the run stops if the generalist's pretrained tag or config says otherwise.
        std: Per-channel standard deviation of the normalisation; default OpenAI CLIP's.
        batch_size: Test batch size.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (faster host-to-GPU copies).
        seed: Seed of the on-the-fly corruptions.
        corruption_cache: With on-the-fly corruptions, a folder where each generated split is saved (in the
            T³ authors' MedMNIST-C layout) the first time and read back on later runs.
        dicom: Which files of image folders are DICOM: ``suffix`` (those ending in .dcm or .dicom) or ``all`` (every
            file that is not a PNG, JPEG, TIFF, …: a PACS export's files often have no suffix).
        dicom_windowing: Apply a DICOM file's VOI LUT or window (Window Center/Width), as viewers display it; false
            maps the modality values' whole range to 8 bits.
        mixes: Mixed splits: a new split's name → the run's splits it mixes, by name or shell pattern, e.g.
            ``{stream: [in_domain, '*@*']}`` (every corrupted split); shuffled once with ``seed`` into one split whose
            batches mix them, every sample with its own class set (``mixing.py``). ``test`` only.
        expert_of: With several experts (``model.experts``), the expert of each split's domain, by split name or
            shell pattern, e.g. ``{'blood_*': blood}``; a mix's samples take their source split's. Gives each method's
            accuracy normalised by that expert's and the routing figure (which expert T³ weighted most).
        calibration: Labelled data that fixes each method's deferral threshold and conformal sets before the splits
            are seen (``model.guarantee``), not evaluated itself: ``val`` (the modality's MedMNIST val split), a
            file or folder under ``root`` (its ``split_key`` split), or ``<split>:<fraction>`` (e.g.
            ``in_domain:0.2``: a seeded fraction held out of a split, which is evaluated on the rest).
    """

    def __init__(
        self,
        root: str,
        modality: str | list[str] | None = None,
        splits: list[str] | None = None,
        sources: dict[str, str] | None = None,
        corruptions: list[str] | None = None,
        severities: tuple[int, ...] = SEVERITIES,
        corruption_source: Literal["files", "on_the_fly"] = "files",
        size: int = 224,
        flag: str | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        split_key: str = "test",
        image_size: int = 224,
        mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
        std: tuple[float, float, float] = OPENAI_DATASET_STD,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        corruption_cache: str | None = None,
        dicom: DicomFiles = "suffix",
        dicom_windowing: bool = True,
        mixes: dict[str, list[str]] | None = None,
        expert_of: dict[str, str] | None = None,
        calibration: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # logged with the final metrics, by the module
        self.modalities = [get_modality(m) for m in ([modality] if isinstance(modality, str) else modality or [])]
        self.modality = self.modalities[0] if len(self.modalities) == 1 else None
        """The one modality of the run (None with several: each is read by a data module of its own)."""
        unknown = sorted(set(splits or ()) - set(SPLIT_KINDS))
        if unknown:
            raise InputError(f"data.splits: unknown split kind(s) {unknown}; choose from {list(SPLIT_KINDS)}")
        if not self.modalities and not sources:
            raise InputError("data: give a modality, or sources (split name → file) for your own splits")
        repeated = sorted({m.name for m in self.modalities if [n.name for n in self.modalities].count(m.name) > 1})
        if repeated:
            raise InputError(f"data.modality: {repeated} given more than once; name each modality once")
        if len(self.modalities) > 1 and classnames is not None:
            raise InputError("data.classnames: with several modalities each split takes its own modality's names")
        for m in self.modalities if corruptions else ():
            unknown = sorted(set(corruptions) - known_corruptions(m))
            if unknown:
                raise InputError(
                    f"data.corruptions: unknown for {m.name}: {unknown}; known: {sorted(known_corruptions(m))}"
                )
        bad = [s for s in severities if s not in SEVERITIES]
        if bad:
            raise InputError(f"data.severities: {bad} outside 1..5")
        if corruption_source not in ("files", "on_the_fly"):
            raise InputError(f"data.corruption_source must be 'files' or 'on_the_fly', got {corruption_source!r}")
        if batch_size < 1:
            raise InputError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise InputError(f"data.num_workers must be >= 0 (0: read in the main process), got {num_workers}")
        if dicom not in ("suffix", "all"):
            raise InputError(f"data.dicom must be 'suffix' or 'all', got {dicom!r}")
        self.dicom, self.dicom_windowing = dicom, dicom_windowing
        self.mixes, self.expert_of = dict(mixes or {}), dict(expert_of or {})
        self.calibration = calibration
        flag = flag or (self.modality.medmnist_flag if self.modality else None)
        self.root, self.flag, self.size = Path(root), flag, size
        self.kinds = list(splits or SPLIT_KINDS) if self.modalities else []
        self.sources = dict(sources or {})
        self.corruptions = list(corruptions) if corruptions is not None else None
        self.severities, self.corruption_source, self.seed = list(severities), corruption_source, seed
        self.corruption_cache = Path(corruption_cache) if corruption_cache is not None else None
        self.classnames_given = classnames is not None
        self.classnames = list(classnames) if classnames is not None else medmnist_classnames(flag) if flag else None
        """The names of the splits that do not name their own classes (None: every split must)."""
        if templates is not None and not templates:
            raise InputError("data.templates: an empty list; give at least one template with {}, or leave it out")
        self.templates = list(templates or (self.modality.templates if self.modality else ("a photo of a {}.",)))
        for template in self.templates:
            check_template(template)
        self.split_key, self.image_size = split_key, image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        # WholeBatchSampler: with more processes than batches, some processes read none of a split.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.datasets: dict[str, Dataset] = {}
        self.domain_experts: dict[str, str] = {}
        """The expert of each split's domain (``expert_of``), for the splits it names."""
        self.split_classnames: dict[str, list[str]] = {}
        self.split_templates: dict[str, list[str]] = {}
        """Each split's prompt templates where they are not ``templates`` (a modality's among several)."""
        self.dicom_records: dict[str, dict] = {}
        """What reading each split's DICOM files applies (``images.dicom_summary``), for the splits that have any."""

    @property
    def split_names(self) -> list[str]:
        return list(self.datasets)

    def setup(self, stage: str | None = None) -> None:
        """Open and check every split before any model is loaded (Lightning calls this hook first); to predict, the
        unlabelled images of each of ``sources``."""
        if self.datasets:
            return
        transform = open_clip.image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std)
        if stage == "predict":
            aside = [f"data.{name}" for name in TEST_ONLY if getattr(self, name)]
            if aside:  # a test config taken as it is
                rank_zero_info(f"predict leaves aside {', '.join(aside)}: settings of test (labelled splits)")
            self._setup_unlabelled(transform)
            return
        for name, (dataset, classnames) in self._read_splits().items():
            check_classnames(name, classnames)
            check_labels(name, dataset.labels, len(classnames))
            self.datasets[name] = Preprocessed(dataset, transform)
            self.split_classnames[name] = classnames
            if getattr(dataset, "dicom", None):
                self.dicom_records[name] = dataset.dicom
        calibration = self._calibration_split(transform)  # a fraction held out of a split leaves it the rest
        self.domain_experts = domain_experts(self.expert_of, list(self.datasets))
        self.datasets.update(build_mixes(self.mixes, self.datasets, self.split_classnames, self.seed))
        if calibration is not None:
            self.datasets = {CALIBRATION: calibration, **self.datasets}

    def _calibration_split(self, transform: Callable, predicting: bool = False) -> Dataset | None:
        """``calibration``'s samples, checked as a split's (read first: they fix the rules the splits are judged by);
        a fraction held out of a split is taken from it here (not in ``predicting``: its sources have no labels)."""
        spec = self.calibration
        if spec is None:
            return None
        held = held_out(spec)
        if predicting and held is not None:  # a test config's: its splits are not predict's sources
            rank_zero_info(
                f"predict leaves aside data.calibration {spec!r}: a part of a test split, which predict lacks"
            )
            return None
        if spec in self.datasets:
            raise InputError(
                f"data.calibration: {spec!r} is a split of the run; calibrating on the samples it evaluates would "
                f"judge the rule on its own data: hold a fraction out ({spec}:0.2), or name other data"
            )
        if held is not None:
            name, fraction = held
            if name not in self.datasets:
                raise InputError(
                    f"data.calibration: {spec!r} names no split of the run; its splits: {list(self.datasets)}"
                )
            calibration, rest = split_rows(self.datasets[name].base, fraction, self.seed, name)
            self.datasets[name] = Preprocessed(rest, transform)
            classnames = self.split_classnames[name]
            self.split_templates.setdefault(CALIBRATION, self.templates_of(name))
        elif spec == VAL:
            if self.modality is None:
                raise InputError(
                    "data.calibration: 'val' is the MedMNIST val split of the run's modality; give data.modality, or "
                    "a labelled file or folder under data.root, or a fraction of a split (in_domain:0.2)"
                )
            calibration = read_medmnist_npz(self.root / medmnist_filename(self.flag, self.size), VAL)
            classnames = self.classnames
        else:
            calibration, classnames = self._read_source(CALIBRATION, self.root / spec)
        check_classnames(CALIBRATION, classnames)
        check_labels(CALIBRATION, calibration.labels, len(classnames))
        self.split_classnames[CALIBRATION] = classnames
        return Preprocessed(calibration, transform)

    def _setup_unlabelled(self, transform: Callable) -> None:
        """predict: every source as unlabelled images (each row named in ``identities``), all predicted among the
        class names given; one error listing every source that cannot be read."""
        if len(self.modalities) > 1:
            raise InputError(
                "data.modality: predict puts every source in one class set; give one modality, or data.flag or "
                "data.classnames, not several modalities"
            )
        if not self.sources:
            raise InputError(
                "data.sources: predict reads the images named there (split name → an image folder, npz file or "
                "Hugging Face dataset folder under data.root)"
            )
        if self.classnames is None:
            raise InputError(
                "data.classnames: predict names its classes by data.classnames (in the order of the "
                "model's labels) or by a data.flag / modality's MedMNIST metadata"
            )
        check_classnames("predict", self.classnames)
        problems = []
        for name, source in self.sources.items():
            try:
                images = read_unlabelled(self.root / source, self.split_key, self.dicom, self.dicom_windowing)
            except InputError as err:
                problems.append(str(err))
                continue
            self.datasets[name] = Preprocessed(images, transform)
            self.split_classnames[name] = self.classnames
            if images.dicom:
                self.dicom_records[name] = images.dicom
        raise_problems(problems)
        calibration = self._calibration_split(transform, predicting=True)
        if calibration is not None:  # labelled: the rule predict applies to every source
            self.datasets = {CALIBRATION: calibration, **self.datasets}

    def templates_of(self, split: str) -> list[str]:
        """The prompt templates of ``split``'s class names."""
        return self.split_templates.get(split, self.templates)

    def _read_splits(self) -> dict[str, tuple[Dataset, list[str]]]:
        """Every split, or one error listing every split that cannot be read (all missing files at once)."""
        if len(self.modalities) > 1:
            return self._read_modalities()
        readers: dict[str, Callable[[], tuple[Dataset, list[str]] | None]] = {}
        if "in_domain" in self.kinds:
            readers["in_domain"] = lambda: self._source("in_domain") or (self._in_domain, self.classnames)
        if "base_to_novel" in self.kinds:
            readers["base_to_novel"] = lambda: self._source("base_to_novel") or self._base_to_novel()
        if "corrupted" in self.kinds:
            for corruption in self.corruptions or list(modality_corruptions(self.modality)):
                for severity in self.severities:
                    name = corrupted_split_name(corruption, severity)
                    readers[name] = functools.partial(self._corrupted_split, name, corruption, severity)
        for name in self.sources:
            readers.setdefault(name, functools.partial(self._source, name))
        splits, problems = {}, []
        for name, read in readers.items():
            try:
                splits[name] = read()
            except InputError as err:
                problems.append(str(err))
        raise_problems(list(dict.fromkeys(problems)))  # on-the-fly splits share the in-domain file's problem
        return splits

    def _read_modalities(self) -> dict[str, tuple[Dataset, list[str]]]:
        """Several modalities: each one's splits as a data module of that modality alone reads them, named after it,
        then ``sources``; one error listing every split that cannot be read."""
        options = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # Lightning's own are not options
        splits, problems = {}, []
        for m in self.modalities:
            own = EvaluationDataModule(
                **{**options, "modality": m.name, "sources": None, "mixes": None, "expert_of": None}
            )
            try:
                read = own._read_splits()
            except InputError as err:
                problems.append(str(err))
                continue
            for name, split in read.items():
                splits[f"{m.name}_{name}"] = split
                self.split_templates[f"{m.name}_{name}"] = own.templates
        for name in self.sources:
            try:
                splits[name] = self._source(name)
            except InputError as err:
                problems.append(str(err))
        raise_problems(problems)
        return splits

    def _corrupted_split(self, name: str, corruption: str, severity: int) -> tuple[Dataset, list[str]]:
        return self._source(name) or (self._corrupted(corruption, severity), self.classnames)

    def _source(self, name: str) -> tuple[Dataset, list[str]] | None:
        if name not in self.sources:
            return None
        return self._read_source(name, self.root / self.sources[name])

    def _read_source(self, name: str, path: Path) -> tuple[Dataset, list[str]]:
        """A labelled source at ``path``: an npz, an image folder or a Hugging Face dataset, with its class names."""
        if path.suffix == ".npz" or not path.is_dir():
            return read_medmnist_npz(path, self.split_key), self.given_classnames(name, path)
        if dataset_folder_kind(path) == "imagefolder":
            dataset = ImageFolder(path, True, self.dicom, self.dicom_windowing, self.split_key)
            if dataset.left_out:
                why = next(iter(dataset.left_out.values()))
                rank_zero_warn(
                    f"split {name!r}: {len(dataset.left_out)} file(s) of {path} hold no image and are left out "
                    f"(data.dicom all; results.json's dicom record lists them), e.g. {why}"
                )
        else:
            dataset = HFImages(path, self.split_key)
        own = dataset.classnames  # a ClassLabel's names, or an image folder's (its subfolders, alphabetical)
        if own is None:
            return dataset, self.given_classnames(name, path)
        if self.classnames_given and list(own) != self.classnames:
            raise InputError(
                f"split {name!r}: data.classnames {self.classnames} disagree with the class names {path} carries "
                f"{list(own)}; give names that match its labels, or leave data.classnames out to use the data's own"
            )
        return dataset, list(own)

    def given_classnames(self, split: str, path: Path) -> list[str]:
        """The names from data.classnames or data.flag, for a split whose data does not name its classes."""
        if self.classnames is None:
            raise InputError(
                f"split {split!r}: {path} does not name its classes (an npz, or a dataset without a ClassLabel): give "
                "data.classnames in label order, or a data.flag / modality whose MedMNIST metadata names them"
            )
        return self.classnames

    @functools.cached_property
    def _in_domain(self) -> Dataset:
        """Read once: the in-domain split, and the base of every on-the-fly corrupted split."""
        return read_medmnist_npz(self.root / medmnist_filename(self.flag, self.size), self.split_key)

    def _base_to_novel(self) -> tuple[Dataset, list[str]]:
        m = self.modality
        dataset = MedIMetaImages(self.root / "medimeta", m.medimeta_dataset, m.medimeta_task, self.split_key)
        return dataset, dataset.classnames

    def _corrupted(self, corruption: str, severity: int) -> Dataset:
        if self.corruption_source == "files":
            return read_medmnistc_file(self.root / "medmnistc", self.flag, corruption, severity)
        corrupted = CorruptedOnTheFly(self._in_domain, self.flag, corruption, severity, self.seed)
        if self.corruption_cache is None:
            return corrupted
        cached = self.corruption_cache / self.flag / "test" / f"{corruption}_severity_{severity}_seed_{self.seed}.npz"
        if not cached.is_file():
            write_npz_atomic(cached, corrupted)
        return read_medmnist_npz(cached, "test")

    def drop_split(self, name: str) -> None:
        """Leave out a split (one an earlier run already finished, when resuming)."""
        self.datasets.pop(name, None)
        self.split_classnames.pop(name, None)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per split. Under multi-process runs each process reads whole batches of every split,
        the same batches a one-process run reads, without the padding of PyTorch's DistributedSampler that
        would count samples twice."""
        return self._loaders()

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per source, read as ``test_dataloader`` reads splits."""
        return self._loaders()

    def _loaders(self) -> list[DataLoader]:
        return [
            DataLoader(
                self.datasets[name],
                batch_size=self.batch_size,
                sampler=self._sampler(name),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0,
                worker_init_fn=leave_sigterm_to_the_main_process,
            )
            for name in self.split_names
        ]

    def _sampler(self, name: str) -> Sampler:
        dataset = self.datasets[name]
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size == 1:
            return SequentialSampler(dataset)
        return WholeBatchSampler(dataset, self.batch_size, num_replicas=world_size, rank=self.trainer.global_rank)
