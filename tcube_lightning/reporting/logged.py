"""What the run's logger receives (TensorBoard's, by default): each batch's λ and JS, AdaMerging's entropy, the final
metrics with the run's settings, and the figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from tcube_lightning.merging.adamerging import Adaptation
from tcube_lightning.reporting.plots import ExpertRouting, render_figures, run_figures, save_images


def log_batch_coefficients(
    logger: Logger, split: str, step: int, values: dict[str, torch.Tensor], histograms: bool
) -> None:
    """A batch's λ and JS as ``{split}/{name}_{mean,min,max}`` scalars at ``step`` (the batch's index in the
    one-process order) and, with TensorBoard and ``histograms`` (rank 0), as histograms."""
    scalars = {
        f"{split}/{name}_{stat}": float(getattr(v, stat)())
        for name, v in values.items()
        for stat in ("mean", "min", "max")
    }
    logger.log_metrics(scalars, step=step)
    if isinstance(logger, TensorBoardLogger) and histograms:
        for name, v in values.items():
            logger.experiment.add_histogram(f"{split}/{name}", v.float().cpu(), step)


def log_adaptation(logger: Logger, split: str, method: str, adaptation: Adaptation) -> None:
    """AdaMerging's entropy at every step as ``{split}/{method}/entropy`` and, with TensorBoard, a histogram of the
    coefficients it learnt (one per image-tower tensor, layer-wise)."""
    for step, value in enumerate(adaptation.entropy):
        logger.log_metrics({f"{split}/{method}/entropy": value}, step=step)
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_histogram(f"{split}/{method}/coefficients", adaptation.coefficients.float().cpu(), 0)


def log_final_metrics(logger: Logger, metrics: dict[str, dict[str, dict[str, float]]], run_config: dict) -> None:
    """Every split's metrics per method as scalars ``{split}/{metric}/{method}``; with TensorBoard also in its
    HPARAMS tab beside the run's configuration, so that runs (a γ sweep, say) can be compared there."""
    final = {
        f"{split}/{name}/{method}": value
        for split, per_method in metrics.items()
        for method, values in per_method.items()
        for name, value in values.items()
    }
    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(run_config, metrics=final, step=0)
    else:
        logger.log_metrics(final, step=0)


def plot(
    folder: Path,
    logger: Logger | None,
    accuracy: dict[str, dict[str, float]],
    tables: dict[str, dict[str, np.ndarray]],
    diagnostics: dict[str, dict],
    routing: ExpertRouting,
    guarantee: tuple[dict, dict, float] | None = None,
) -> None:
    """PNG files in ``folder``, and the same images in TensorBoard."""
    images = render_figures(run_figures(accuracy, tables, diagnostics, routing, guarantee))
    save_images(folder, images)
    if isinstance(logger, TensorBoardLogger):
        for stem, image in images.items():
            logger.experiment.add_image(f"plots/{stem}", image, dataformats="HWC")
