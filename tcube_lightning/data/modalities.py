"""The evaluation protocol per modality: one entry names every data set a modality is evaluated on.

Class names are never typed here: in-domain ones come from ``medmnist.INFO``, base-to-novel ones from
the MedIMeta task's ``info.yaml``. Adding a modality means adding one entry to ``MODALITIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcube_lightning.errors import InputError


@dataclass(frozen=True)
class Modality:
    name: str
    medmnist_flag: str
    """In-domain test split: the MedMNIST data set."""
    medimeta_dataset: str
    """Base-to-novel split: the MedIMeta data set id and task."""
    medimeta_task: str
    corruptions: tuple[str, ...] | None
    """MedMNIST-C corruptions; None means every corruption medmnistc defines for the flag."""
    templates: tuple[str, ...]
    """Prompt templates; ``{}`` takes the class name."""


MODALITIES = {
    m.name: m
    for m in (
        Modality(
            "blood",
            "bloodmnist",
            "pbc",
            "cell_class",
            (
                "pixelate",
                "jpeg_compression",
                "defocus_blur",
                "motion_blur",
                "brightness_up",
                "brightness_down",
                "contrast_up",
                "contrast_down",
                "saturate",
                "stain_deposit",
                "bubble",
            ),
            ("a microscopic image of a {} blood cell.", "a photo of a {}."),
        ),
        Modality(
            "breast",
            "breastmnist",
            "mammo_mass",
            "pathology",
            (
                "pixelate",
                "jpeg_compression",
                "speckle_noise",
                "motion_blur",
                "brightness_up",
                "brightness_down",
                "contrast_down",
            ),
            ("a breast ultrasound image showing a {} finding.", "a photo of a {}."),
        ),
        Modality(
            "retina",
            "retinamnist",
            "fundus",
            "disease_presence",
            (
                "pixelate",
                "jpeg_compression",
                "gaussian_noise",
                "speckle_noise",
                "defocus_blur",
                "motion_blur",
                "brightness_down",
                "contrast_down",
            ),
            ("a retinal fundus image showing {}.", "a photo of a {}."),
        ),
        Modality(
            "oct",
            "octmnist",
            "oct",
            "disease_class",
            ("pixelate", "jpeg_compression", "speckle_noise", "defocus_blur", "motion_blur", "contrast_down"),
            ("a retinal OCT scan showing {}.", "a photo of a {}."),
        ),
        Modality(
            "pneumonia",
            "pneumoniamnist",
            "pneumonia",
            "disease_class",
            None,
            ("a chest X-ray showing {}.", "a photo of a {}."),
        ),
    )
}


def get_modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise InputError(f"data.modality: unknown modality {name!r}; known: {sorted(MODALITIES)}")
    return MODALITIES[name]


def modality_corruptions(modality: Modality) -> tuple[str, ...]:
    """The modality's corruption list, from medmnistc's registry where the entry leaves it open."""
    if modality.corruptions is not None:
        return modality.corruptions
    try:
        from medmnistc.corruptions.registry import CORRUPTIONS_DS
    except ImportError as err:
        raise InputError(
            f"data.corruptions: modality {modality.name!r} takes its corruption list from medmnistc, which cannot "
            f"be imported ({err}); install medmnistc (and ImageMagick's libmagickwand) or list data.corruptions"
        ) from err
    return tuple(CORRUPTIONS_DS[modality.medmnist_flag])


def known_corruptions(modality: Modality) -> set[str]:
    """Every corruption name accepted for the modality: its own list and medmnistc's for its flag."""
    names = set(modality.corruptions or ())
    try:
        from medmnistc.corruptions.registry import CORRUPTIONS_DS
    except ImportError:
        return names
    return names | set(CORRUPTIONS_DS.get(modality.medmnist_flag, ()))


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
