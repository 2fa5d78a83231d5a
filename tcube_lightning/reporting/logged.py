"""What the run's logger receives (TensorBoard's, by default): each batch's λ, JS and T³ weights under the ``lambda``
groups, AdaMerging's entropy, the run's settings with its headline metrics (HPARAMS), its tables as text panels, and
the figures. Tag names hold letters, digits and underscores only."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from tcube_lightning.merging.adamerging import Adaptation
from tcube_lightning.reporting.plots import ExpertRouting, render_figures, run_figures, save_images
from tcube_lightning.reporting.results import write_atomic


def tag_part(text: str) -> str:
    """A name as a TensorBoard tag part: letters, digits and underscores (no spaces, colons, brackets or '=')."""
    return re.sub(r"[^0-9A-Za-z_.]+", "_", text).strip("_")


def batch_tag(name: str, split: str) -> str:
    """Where a per-batch column goes: its group (``lambda``, then ``lambda_js`` and ``lambda_t3_weight``, which
    TensorBoard sorts right after it) and the split, with a grid setting's or an expert's name after it."""
    quantity, _, rest = name.partition("/")
    if quantity.startswith("lambda["):  # a model.grid setting's λ
        quantity, rest = "lambda", quantity[len("lambda[") : -1] + (f"/{rest}" if rest else "")
    group = {"lambda": "lambda", "js": "lambda_js", "w": "lambda_t3_weight"}[quantity]
    rest = rest.removeprefix("t3/") if quantity == "w" else rest
    return f"{group}/{tag_part(split)}" + (f"_{tag_part(rest)}" if rest else "")


def log_batch_coefficients(
    logger: Logger, split: str, step: int, values: dict[str, torch.Tensor], histograms: bool
) -> None:
    """A batch's λ, JS (and with several experts each one's T³ weight) as ``<group>/<split>_{mean,min,max}`` scalars
    at ``step`` (the batch's index in the one-process order) and, with TensorBoard and ``histograms`` (rank 0), as
    histograms (``batch_tag``)."""
    scalars = {
        f"{batch_tag(name, split)}_{stat}": float(getattr(v, stat)())
        for name, v in values.items()
        for stat in ("mean", "min", "max")
    }
    logger.log_metrics(scalars, step=step)
    if isinstance(logger, TensorBoardLogger) and histograms:
        for name, v in values.items():
            logger.experiment.add_histogram(batch_tag(name, split), v.float().cpu(), step)


def log_adaptation(logger: Logger, split: str, method: str, adaptation: Adaptation) -> None:
    """AdaMerging's entropy at every step as ``steps_adamerging/<split>_<method>_entropy`` and, with TensorBoard, a
    histogram of the coefficients it learnt (one per image-tower tensor, layer-wise). TensorBoard orders groups by
    name: the group's name puts it after the λ groups, which a run opens on."""
    tag = f"steps_adamerging/{tag_part(split)}_{tag_part(method)}"
    for step, value in enumerate(adaptation.entropy):
        logger.log_metrics({f"{tag}_entropy": value}, step=step)
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_histogram(f"{tag}_coefficients", adaptation.coefficients.float().cpu(), 0)


HEADLINE = ("t3", "t3_batch", "zeroshot", "expert")
"""The methods whose top-1 per split the HPARAMS tab shows beside the run's settings (each expert's with several)."""
SETTINGS = {
    "model": ("lambda_min", "lambda_max", "gamma", "lambda_weights", "js_base", "merge_text", "samplewise", "heads"),
    "data": ("modality", "batch_size", "calibration"),
}
"""The run's settings the HPARAMS tab compares runs by (and hparams.yaml records)."""


def run_settings(run_config: dict, experts: list[str]) -> dict:
    """The settings of ``SETTINGS``, T³'s number of experts and rule, flat (``gamma``, ``k_rule``, …)."""
    settings = {key: run_config.get(group, {}).get(key) for group, keys in SETTINGS.items() for key in keys}
    settings["experts"] = len(experts)
    settings["k_rule"] = run_config.get("model", {}).get("k_experts", {}).get("rule") if len(experts) > 1 else None
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in settings.items()}


def log_final_metrics(
    logger: Logger, accuracy: dict[str, dict[str, float]], run_config: dict, experts: list[str], tables: dict[str, str]
) -> None:
    """The run at its end: with TensorBoard the HPARAMS tab (``run_settings`` and the headline methods' top-1 per
    split, ``top1/<split>/<method>``; hparams.yaml the same settings) and one text panel per table of ``tables``
    (results, cost); with another logger the headline metrics as scalars."""
    headline = {
        f"top1/{tag_part(split)}/{tag_part(method)}": value
        for split, by_method in accuracy.items()
        for method, value in by_method.items()
        if method.split(":")[0] in HEADLINE
    }
    if not isinstance(logger, TensorBoardLogger):
        logger.log_metrics(headline, step=0)
        return
    settings = run_settings(run_config, experts)
    logger.log_hyperparams(settings, metrics=headline)
    for name, markdown in tables.items():
        logger.experiment.add_text(name, markdown, 0)
    # Lightning writes hparams.yaml once, when the run starts (empty here: the settings are logged at its end)
    write_atomic(Path(logger.log_dir) / "hparams.yaml", yaml.safe_dump(settings, sort_keys=False))


def plot(
    folder: Path,
    logger: Logger | None,
    accuracy: dict[str, dict[str, float]],
    tables: dict[str, dict[str, np.ndarray]],
    diagnostics: dict[str, dict],
    routing: ExpertRouting,
    guarantee: tuple[dict, dict, float] | None = None,
    note: str | None = None,
) -> None:
    """PNG files in ``folder``, and the same images in TensorBoard (``note``: the accuracy heatmap's caption)."""
    images = render_figures(run_figures(accuracy, tables, diagnostics, routing, guarantee, note))
    save_images(folder, images)
    if isinstance(logger, TensorBoardLogger):
        for stem, image in images.items():
            logger.experiment.add_image(f"plots/{stem}", image, dataformats="HWC")
