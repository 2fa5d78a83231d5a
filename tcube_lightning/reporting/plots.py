"""Pictures of a run: λ histograms, accuracy against corruption severity, the method × split heat map, and per
split the paper's analysis figures (coefficient histograms; JS against DaWin's ratio and against the combined
confidence, per decision quadrant) and the risk–coverage curves of deferral.

Each function returns a matplotlib Figure; ``render_figures`` draws each once, for the PNG files and TensorBoard.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from tcube_lightning.data.splitnames import parse_corrupted
from tcube_lightning.reporting.deferral import SCORES, ranking, selective_risks
from tcube_lightning.reporting.diagnostics import QUADRANTS, quadrant_indices

DPI = 100
SCATTER_CAP = 4000
"""Points drawn per scatter plot at most; beyond it a seeded random subset (the statistics use every sample)."""


def lambda_histograms(lambdas: dict[str, np.ndarray], columns: int = 4) -> Figure:
    """One small histogram of the per-sample λ for every split."""
    rows = math.ceil(len(lambdas) / columns)
    fig, axes = plt.subplots(
        rows, min(columns, len(lambdas)), figsize=(3 * min(columns, len(lambdas)), 2.4 * rows), dpi=DPI, squeeze=False
    )
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


def line_styles():
    """A distinct (colour, line style, marker) for every line: 10 colours × 4 dash patterns × 6 markers, so
    that 17 methods (and more) stay apart even where colours repeat or lines overlap."""
    colours = plt.get_cmap("tab10").colors
    dashes, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v", "P")
    index = 0
    while True:
        yield {"color": colours[index % 10], "linestyle": dashes[(index // 10) % 4], "marker": markers[index % 6]}
        index += 1


def accuracy_heatmap(accuracy: dict[str, dict[str, float]], note: str | None = None) -> Figure:
    """Top-1 of every method (rows) on every split (columns); ``note`` (with several experts, which rows are our
    extension of T³) as a caption under it, as under the run's tables."""
    splits = list(accuracy)
    methods = list(next(iter(accuracy.values())))
    values = np.array([[100 * accuracy[s][m] for s in splits] for m in methods])
    width = max(5.0, 2 + 0.6 * len(splits))
    caption = textwrap.fill(note, width=int(20 * width)) if note else ""  # some 20 characters an inch at 6 pt
    caption_height = 0.15 + 0.1 * len(caption.splitlines()) if caption else 0.0
    height = 1 + 0.35 * len(methods) + caption_height
    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI)
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
    if caption:
        fig.text(0.02, 0.02, caption, fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, caption_height / height, 1, 1))
    return fig


def scatter_rows(count: int, cap: int = SCATTER_CAP, seed: int = 0) -> np.ndarray:
    """The rows a scatter plot draws: every one up to ``cap``, beyond it ``cap`` rows drawn with a seeded
    generator (in their order), so that figures of large splits stay light and repeatable."""
    if count <= cap:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, cap, replace=False))


def coefficient_histograms(table: dict[str, np.ndarray], split: str, columns: int = 4) -> Figure:
    """The paper's Figure 1 for one split: a histogram of each dynamic method's per-sample expert weight."""
    names = [name for name in table if name.startswith("w/")]
    rows = math.ceil(len(names) / columns)
    width = min(columns, len(names))
    fig, axes = plt.subplots(rows, width, figsize=(3 * width, 2.4 * rows), dpi=DPI, squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.hist(table[name], bins=30, range=(0.0, max(1.0, float(table[name].max()))), color="tab:blue")
        ax.set_title(name.removeprefix("w/"), fontsize=9)
        ax.set_xlabel("weight on the expert", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(split, fontsize=10)
    fixed_layout(fig, top=1 - 0.6 / (2.4 * rows))
    return fig


def quadrant_scatter(
    table: dict[str, np.ndarray], y: np.ndarray, y_label: str, title: str, correlations: dict[str, float | None]
) -> Figure:
    """JS against ``y``, one panel per decision quadrant (pretrained right/wrong × expert right/wrong), with the
    quadrant's sample count and, where given, Pearson's ρ over all its samples."""
    quadrant, drawn = quadrant_indices(table), scatter_rows(len(y))
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), dpi=DPI, sharex=True, sharey=True)
    for index, (ax, name) in enumerate(zip(axes.flat, QUADRANTS)):
        rows = drawn[quadrant[drawn] == index]
        ax.scatter(table["js"][rows], y[rows], s=6, alpha=0.5, color="tab:blue")
        rho = correlations.get(name)
        ax.set_title(
            f"{name}: n={int((quadrant == index).sum())}" + (f", ρ={rho:.3f}" if rho is not None else ""), fontsize=9
        )
        ax.set_xlabel("JS", fontsize=8)
        ax.set_ylabel(y_label, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fixed_layout(fig, top=0.92)
    return fig


HIGHLIGHTED = ("t3", "t3_batch", "zeroshot", "expert")
"""Drawn in colour in the per-split figures of many methods (with the best other baseline): the rest muted."""


def highlighted(methods: list[str], scores: dict[str, float]) -> dict[str, str]:
    """The methods drawn in colour, each with its colour: T³, T³_B, the two models (each expert's column with
    several) and the other method with the lowest ``scores`` (the best baseline)."""
    chosen = [m for m in methods if m.split(":")[0] in HIGHLIGHTED]
    others = [m for m in methods if m not in chosen]
    if others:
        chosen.append(min(others, key=lambda m: scores[m]))
    return dict(zip(chosen, plt.get_cmap("tab10").colors, strict=False))


def risk_coverage(table: dict[str, np.ndarray], split: str) -> Figure:
    """Deferral's risk–coverage curves (``deferral.py``) of every method in the table: the samples ranked by the
    method's own top probability (left) and by JS between the two models (right), most trusted first. T³, T³_B, the
    two models and the best other method (lowest area under the curve by its own probability) in colour, in one
    legend; the others thin and grey."""
    methods = [name.removeprefix("pred/") for name in table if name.startswith("pred/")]
    curves = {}
    for score in SCORES:
        for method in methods:
            correct = table[f"pred/{method}"] == table["label"]
            curves[score, method] = selective_risks(correct, ranking(table, method, score))
    colours = highlighted(methods, {m: float(np.mean(curves[SCORES[0], m])) for m in methods})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), dpi=DPI, sharey=True)
    for ax, score, title in zip(axes, SCORES, ("by its own top probability", "by JS (the models agree first)")):
        for method in sorted(methods, key=lambda m: m in colours):  # the highlighted ones on top
            risks = curves[score, method]
            coverage = np.arange(1, len(risks) + 1) / len(risks)
            style = {"color": "0.8", "linewidth": 0.8, "zorder": 1}
            if method in colours:
                style = {"color": colours[method], "linewidth": 1.8, "zorder": 3, "label": method}
            ax.plot(coverage, risks, **style)
        ax.set_title(f"{split}: samples kept {title}", fontsize=9)
        ax.set_xlabel("coverage (fraction kept; the rest deferred)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("selective risk (error on the kept)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    others = len(methods) - len(colours)
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=len(labels),
        fontsize=7,
        frameon=False,
        title=f"grey: the {others} other methods" if others else None,
        title_fontsize=7,
    )
    fixed_layout(fig, top=0.78)
    return fig


def fixed_layout(fig: Figure, top: float) -> None:
    """Margins for the per-split figures (small titles and labels), set rather than measured: ``tight_layout``
    draws a figure once more to measure its text, and a run has three such figures per split."""
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=top, wspace=0.3, hspace=0.45)


def analysis_figures(split: str, table: dict[str, np.ndarray], quadrants: dict[str, dict]) -> dict[str, Figure]:
    """The paper's Figures 1–3 for one split, by file stem (``split/name``)."""
    rho = {name: cell["pearson_js_dawin"] for name, cell in quadrants.items()}
    confidence = (table["prob/zeroshot"].astype(np.float64) + table["prob/expert"]) / 2
    return {
        f"{split}/coefficients": coefficient_histograms(table, split),
        f"{split}/js_vs_dawin": quadrant_scatter(table, table["w/dawin"], "DaWin entropy ratio", split, rho),
        f"{split}/confidence_vs_js": quadrant_scatter(
            table, confidence, "combined confidence ½(c_pt + c_ft)", split, {}
        ),
        f"{split}/risk_coverage": risk_coverage(table, split),
    }


def domain_of_samples(table: dict[str, np.ndarray], split: str, routing: ExpertRouting) -> np.ndarray | None:
    """Each sample's domain expert (an index into ``routing.experts``): its split's; None where the split has none,
    and for a mix, whose samples are counted in its source splits."""
    if split in routing.mix_sources or split not in routing.domains:
        return None
    return np.full(len(table["index"]), routing.experts.index(routing.domains[split]))


def expert_weights(tables: dict[str, dict[str, np.ndarray]], routing: ExpertRouting) -> Figure:
    """With several experts (our extension of T³): per split, the mean T³ weight each expert got (which expert did
    the samples of each split pull?); with ``data.expert_of``, the routing confusion beside it: the samples' domain
    expert against the expert T³ weighted most, each row in percent of its samples."""
    experts, splits = routing.experts, list(tables)
    weights = {split: np.stack([table[f"w/t3/{e}"] for e in experts], axis=-1) for split, table in tables.items()}
    confusion = np.zeros((len(experts), len(experts)))
    for split, table in tables.items():
        domain = domain_of_samples(table, split, routing)
        if domain is not None:
            np.add.at(confusion, (domain, weights[split].argmax(-1)), 1)
    panels = 2 if confusion.any() else 1
    fig, axes = plt.subplots(1, panels, figsize=(4 + 5 * panels, 3 + 0.4 * max(len(splits), len(experts))), dpi=DPI)
    axes = np.atleast_1d(axes)
    means = np.array([weights[split].mean(0) for split in splits])
    cells = [(axes[0], means, splits, "mean T³ weight w_k", ".3f")]
    if panels == 2:
        rows = confusion.sum(1, keepdims=True)
        share = np.divide(100 * confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
        cells.append(
            (
                axes[1],
                share,
                [f"{e} ({int(n)})" for e, n in zip(experts, rows[:, 0])],
                "% of the domain's samples",
                ".0f",
            )
        )
    scales = [max(float(means.max()), 1e-12), 100.0]  # both from 0: nearly equal weights look nearly equal
    for (ax, values, labels, title, fmt), top in zip(cells, scales, strict=False):
        image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0.0, vmax=top)
        ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for (i, j), value in np.ndenumerate(values):  # black on viridis's light half, white on its dark half
            colour = "black" if value / top > 0.55 else "white"
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7, color=colour)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
    axes[0].set_xlabel("expert", fontsize=8)
    if panels == 2:
        axes[1].set_xlabel("expert T³ weighted most", fontsize=8)
        axes[1].set_ylabel("domain expert (data.expert_of; samples)", fontsize=8)
    fig.suptitle("T³ with several experts (our extension of the paper)", fontsize=10)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ExpertRouting:
    """What the figures of a run with several experts need besides the tables: the experts, each split's domain
    expert (``data.expert_of``) and each mix's source splits (a mix's samples are counted once, in its sources)."""

    experts: list[str]
    domains: dict[str, str]
    mix_sources: dict[str, list[str]]


def guarantee_conditions(guarantee: dict[str, dict], sources: dict[str, dict]) -> list[tuple[str, dict]]:
    """The conditions the guarantee figure shows, in order: each plain split, each corruption severity (the mean
    over its corruptions), each mix's sources: (label, method → its rule's record by confidence)."""
    by_severity: dict[int, list[dict]] = {}
    conditions = []
    for split, methods in guarantee.items():
        if not methods or split in sources:
            continue
        parsed = parse_corrupted(split)
        rules = {m: r["selective"]["confidence"] for m, r in methods.items()}
        if parsed is None:
            conditions.append((split, rules))
        else:
            by_severity.setdefault(parsed[1], []).append(rules)
    for severity in sorted(by_severity):
        parts = by_severity[severity]
        mean = {
            m: {
                "coverage": float(np.mean([p[m]["coverage"] for p in parts])),
                "risk": _mean_or_none([p[m]["risk"] for p in parts]),
            }
            for m in parts[0]
        }
        conditions.append((f"severity {severity}", mean))
    for mix, parts in sources.items():
        for source, record in parts.items():
            rules = {m: r["selective"]["confidence"] for m, r in record.get("guarantee", {}).items()}
            if rules:
                conditions.append((f"{mix}: {source}", rules))
    return conditions


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def guarantee_figure(guarantee: dict[str, dict], sources: dict[str, dict], alpha: float) -> Figure | None:
    """Realised selective risk (α dashed) and coverage of each method's calibrated rule per condition: T³, T³_B and the
    two models in colour, the other methods grey; None without a calibration."""
    conditions = guarantee_conditions(guarantee, sources)
    if not conditions:
        return None
    labels = [label for label, _ in conditions]
    methods = list(conditions[0][1])
    fig, (risk_ax, coverage_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
    colours = dict(zip(HIGHLIGHTED, plt.get_cmap("tab10").colors, strict=False))
    for method in sorted(methods, key=lambda m: m.split(":")[0] in HIGHLIGHTED):  # highlighted on top
        family = method.split(":")[0]
        style = {"color": "0.75", "linewidth": 1.0, "marker": ".", "zorder": 1}
        if family in colours:
            style = {"color": colours[family], "linewidth": 2.2, "marker": "o", "label": method, "zorder": 3}
        risks = [np.nan if rules[method]["risk"] is None else 100 * rules[method]["risk"] for _, rules in conditions]
        risk_ax.plot(labels, risks, **style)
        coverage_ax.plot(labels, [100 * rules[method]["coverage"] for _, rules in conditions], **style)
    risk_ax.axhline(100 * alpha, color="black", linestyle="--", linewidth=1.2, label=f"α = {alpha:g}")
    risk_ax.set(ylabel="selective risk (%)", title="risk of the accepted samples", ylim=(0, None))
    coverage_ax.set(ylabel="coverage (%)", title="samples accepted", ylim=(0, 100))
    for ax in (risk_ax, coverage_ax):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(alpha=0.3)
    handles, names = risk_ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig


def run_figures(
    accuracy: dict[str, dict[str, float]],
    tables: dict[str, dict[str, np.ndarray]],
    diagnostics: dict[str, dict],
    routing: ExpertRouting | None = None,
    guarantee: tuple[dict, dict, float] | None = None,
    note: str | None = None,
) -> dict[str, Figure]:
    """Every figure of a run, by file stem; the per-split ones for the splits with a per-sample table. With several
    experts (``routing``) the expert-weight figure in place of the λ histograms, and no quadrant figures (those are of
    the generalist and one expert). ``guarantee``: each split's calibrated rules, each mix's per source, and α.
    ``note``: the caption under the accuracy heatmap."""
    figures = {"accuracy_heatmap": accuracy_heatmap(accuracy, note)}
    calibrated = guarantee_figure(*guarantee) if guarantee is not None else None
    if calibrated is not None:
        figures["guarantee"] = calibrated
    several = routing is not None and len(routing.experts) > 1
    if tables and not several:
        figures["lambda_histograms"] = lambda_histograms({split: table["lambda"] for split, table in tables.items()})
    if tables and several and all(f"w/t3/{routing.experts[0]}" in table for table in tables.values()):
        figures["expert_weights"] = expert_weights(tables, routing)
    figures.update({f"severity_{c}": fig for c, fig in severity_curves(accuracy).items()})
    for split, table in tables.items():
        if several:
            figures[f"{split}/coefficients"] = coefficient_histograms(table, split)
            figures[f"{split}/risk_coverage"] = risk_coverage(table, split)
        else:
            figures.update(analysis_figures(split, table, diagnostics[split]["quadrants"]))
    return figures


def render_figures(figures: dict[str, Figure]) -> dict[str, np.ndarray]:
    """Each figure drawn once, as an RGB image (height × width × 3, uint8): the PNG file and the TensorBoard image
    are both made from it, so no figure is drawn twice. The figures are closed."""
    images = {}
    for stem, figure in figures.items():
        figure.canvas.draw()
        images[stem] = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    close_figures(figures)
    return images


def save_images(folder: str | Path, images: dict[str, np.ndarray]) -> list[Path]:
    """PNG files under ``folder``, one per image (a stem ``a/b`` in a subfolder)."""
    paths = []
    for stem, image in images.items():
        paths.append(Path(folder) / f"{stem}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(paths[-1])
    return paths


def close_figures(figures: dict[str, Figure]) -> None:
    for figure in figures.values():
        plt.close(figure)
