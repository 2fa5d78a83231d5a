"""Pictures of a run: λ histograms, accuracy against corruption severity, and the method × split heat map.

Each function returns a matplotlib Figure (for TensorBoard) and ``save_figures`` writes them as PNGs.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from tcube_lightning.splitnames import parse_corrupted  # noqa: E402

DPI = 100


def lambda_histograms(lambdas: dict[str, np.ndarray], columns: int = 4) -> Figure:
    """One small histogram of the per-sample λ for every split."""
    rows = math.ceil(len(lambdas) / columns)
    fig, axes = plt.subplots(rows, min(columns, len(lambdas)), figsize=(3 * min(columns, len(lambdas)), 2.4 * rows),
                             dpi=DPI, squeeze=False)  # fmt: skip
    for ax, (split, values) in zip(axes.flat, lambdas.items()):
        low, high = float(values.min()), float(values.max())
        pad = max(1e-3, 0.05 * (high - low))  # λ can be (nearly) constant: keep the bins finite
        ax.hist(values, bins=30, range=(low - pad, high + pad), color="tab:blue")
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("λ", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(lambdas) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def severity_curves(accuracy: dict[str, dict[str, float]]) -> dict[str, Figure]:
    """Per corruption: top-1 against severity, one line per method (splits named ``corruption@severity``)."""
    by_corruption: dict[str, list[tuple[int, str]]] = {}
    for split in accuracy:
        parsed = parse_corrupted(split)
        if parsed is not None:
            by_corruption.setdefault(parsed[0], []).append((parsed[1], split))
    figures = {}
    for corruption, points in by_corruption.items():
        points.sort()
        fig, ax = plt.subplots(figsize=(8, 4), dpi=DPI)
        for method, style in zip(accuracy[points[0][1]], line_styles()):
            values = [100 * accuracy[split][method] for _, split in points]
            ax.plot([s for s, _ in points], values, label=method, **style)
        ax.set(title=corruption, xlabel="severity", ylabel="top-1 (%)", xticks=[s for s, _ in points])
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # outside the axes
        fig.tight_layout()
        figures[corruption] = fig
    return figures


def line_styles():  # noqa: ANN201 - an endless iterator of keyword dicts
    """A distinct (colour, line style, marker) for every line: 10 colours × 4 dash patterns × 6 markers, so
    that 17 methods (and more) stay apart even where colours repeat or lines overlap."""
    colours = plt.get_cmap("tab10").colors
    dashes, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v", "P")
    index = 0
    while True:
        yield {"color": colours[index % 10], "linestyle": dashes[(index // 10) % 4], "marker": markers[index % 6]}
        index += 1


def accuracy_heatmap(accuracy: dict[str, dict[str, float]]) -> Figure:
    """Top-1 of every method (rows) on every split (columns)."""
    splits = list(accuracy)
    methods = list(next(iter(accuracy.values())))
    values = np.array([[100 * accuracy[s][m] for s in splits] for m in methods])
    fig, ax = plt.subplots(figsize=(max(5.0, 2 + 0.6 * len(splits)), 1 + 0.35 * len(methods)), dpi=DPI)
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(splits)), splits, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    if values.size <= 400:
        # Cell text in the colour that contrasts with its cell: black on viridis's light half, white on the dark.
        low, high = float(values.min()), float(values.max())
        for (i, j), value in np.ndenumerate(values):
            light = high > low and (value - low) / (high - low) > 0.55
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7, color="black" if light else "white")
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    return fig


def run_figures(accuracy: dict[str, dict[str, float]], lambdas: dict[str, np.ndarray]) -> dict[str, Figure]:
    """Every figure of a run, by file stem."""
    figures = {"accuracy_heatmap": accuracy_heatmap(accuracy)}
    if lambdas:
        figures["lambda_histograms"] = lambda_histograms(lambdas)
    figures.update({f"severity_{c}": fig for c, fig in severity_curves(accuracy).items()})
    return figures


def save_figures(folder: str | Path, figures: dict[str, Figure]) -> list[Path]:
    """PNG files under ``folder``; the figures stay open for the caller (e.g. for TensorBoard)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig in figures.items():
        paths.append(folder / f"{stem}.png")
        fig.savefig(paths[-1])
    return paths


def close_figures(figures: dict[str, Figure]) -> None:
    for figure in figures.values():
        plt.close(figure)
