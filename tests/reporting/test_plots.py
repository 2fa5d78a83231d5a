"""The figures' content (what is drawn, from which numbers), read back from the matplotlib objects."""

import numpy as np

from helpers import random_sample_table
from tcube_lightning.reporting.diagnostics import QUADRANTS, decision_diagnostics
from tcube_lightning.reporting.plots import (
    ExpertRouting,
    accuracy_heatmap,
    analysis_figures,
    close_figures,
    expert_weights,
    lambda_histograms,
    risk_coverage,
    run_figures,
    scatter_rows,
    severity_curves,
)

ACCURACY = {
    "in_domain": {"zeroshot": 0.8, "t3": 0.9},
    "blur@2": {"zeroshot": 0.4, "t3": 0.6},
    "blur@1": {"zeroshot": 0.6, "t3": 0.7},
}


def test_severity_curves_plot_top1_against_severity_per_method():
    (figure,) = severity_curves(ACCURACY).values()
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {"zeroshot", "t3"}
    np.testing.assert_array_equal(lines["t3"].get_xdata(), [1, 2])  # sorted by severity
    np.testing.assert_allclose(lines["t3"].get_ydata(), [70.0, 60.0])
    close_figures({"blur": figure})


def test_heatmap_holds_every_method_and_split():
    figure = accuracy_heatmap(ACCURACY)
    data = figure.axes[0].images[0].get_array()
    np.testing.assert_allclose(data, [[80.0, 40.0, 60.0], [90.0, 60.0, 70.0]])
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["zeroshot", "t3"]
    assert not figure.texts  # no caption without a note
    close_figures({"heatmap": figure})


def test_the_heatmaps_caption_is_the_note_and_stays_below_its_rows():
    note = "t3: T³ with several experts, our extension of the paper (which merges one generalist with one expert). " * 3
    figure = accuracy_heatmap(ACCURACY, note)
    (caption,) = figure.texts
    assert " ".join(caption.get_text().split()) == note.strip()
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    below = caption.get_window_extent(renderer).y1  # the caption's top edge, in pixels from the bottom
    assert below < figure.axes[0].get_tightbbox(renderer).y0  # under the tick labels of the splits
    assert caption.get_window_extent(renderer).x1 <= figure.bbox.x1  # not cut at the right edge
    close_figures({"heatmap": figure})


def test_lambda_histograms_count_every_sample_and_run_figures_names_them():
    lambdas = {"in_domain": np.linspace(0.4, 0.6, 50), "blur@1": np.full(7, 0.5)}  # a constant λ too
    figure = lambda_histograms(lambdas)
    counts = [sum(p.get_height() for p in ax.patches) for ax in figure.axes[:2]]
    assert counts == [50, 7]
    tables = {split: random_sample_table(len(values)) | {"lambda": values} for split, values in lambdas.items()}
    figures = run_figures(ACCURACY, tables, {split: decision_diagnostics(table) for split, table in tables.items()})
    names = ("coefficients", "js_vs_dawin", "confidence_vs_js", "risk_coverage")
    per_split = {f"{s}/{name}" for s in lambdas for name in names}
    assert set(figures) == {"accuracy_heatmap", "lambda_histograms", "severity_blur", *per_split}
    close_figures({**figures, "histograms": figure})


def test_several_experts_get_the_routing_figure_in_place_of_lambda_histograms_and_quadrants():
    """What a run with several experts draws (our extension of T³): the figures a run with one expert draws of the
    generalist and that expert are left out."""
    tables = {
        split: random_sample_table(20, seed) | {"w/t3/a": np.full(20, 0.3), "w/t3/b": np.full(20, 0.2)}
        for seed, split in enumerate(("in_domain", "blur@1"))
    }
    routing = ExpertRouting(["a", "b"], {"in_domain": "a", "blur@1": "b"}, {})
    figures = run_figures(ACCURACY, tables, {}, routing)
    per_split = {f"{split}/{name}" for split in tables for name in ("coefficients", "risk_coverage")}
    assert set(figures) == {"accuracy_heatmap", "expert_weights", "severity_blur", *per_split}
    close_figures(figures)


def test_no_per_sample_figure_without_tables():
    figures = run_figures(ACCURACY, {}, {})
    assert set(figures) == {"accuracy_heatmap", "severity_blur"}
    close_figures(figures)


def test_the_analysis_figures_draw_every_coefficient_and_each_quadrants_samples():
    table = random_sample_table(120)
    quadrants = decision_diagnostics(table)["quadrants"]
    figures = analysis_figures("blur@1", table, quadrants)
    histograms = figures["blur@1/coefficients"].axes
    assert [ax.get_title() for ax in histograms] == ["t3", "dawin", "xent", "maxconf"]
    assert all(sum(p.get_height() for p in ax.patches) == 120 for ax in histograms)  # every sample, each weight
    pt_right, ft_right = table["pred/zeroshot"] == table["label"], table["pred/expert"] == table["label"]
    rows = {
        "both wrong": ~pt_right & ~ft_right,
        "only expert right": ~pt_right & ft_right,
        "only pretrained right": pt_right & ~ft_right,
        "both right": pt_right & ft_right,
    }
    confidence = (table["prob/zeroshot"] + table["prob/expert"]) / 2
    for stem, y in (("js_vs_dawin", table["w/dawin"]), ("confidence_vs_js", confidence)):
        panels = figures[f"blur@1/{stem}"].axes
        for ax, name in zip(panels, QUADRANTS):
            points = ax.collections[0].get_offsets()
            np.testing.assert_array_equal(points, np.column_stack([table["js"], y])[rows[name]])
            assert ax.get_title().startswith(f"{name}: n={int(rows[name].sum())}")
    rho = quadrants["both right"]["pearson_js_dawin"]
    assert figures["blur@1/js_vs_dawin"].axes[3].get_title().endswith(f"ρ={rho:.3f}")
    close_figures(figures)


def test_scatter_plots_of_large_splits_draw_a_seeded_subset():
    assert scatter_rows(10, cap=20).tolist() == list(range(10))
    drawn = scatter_rows(1000, cap=100, seed=0)
    assert len(drawn) == 100 == len(set(drawn.tolist())) and (np.diff(drawn) > 0).all() and drawn.max() < 1000
    np.testing.assert_array_equal(drawn, scatter_rows(1000, cap=100, seed=0))  # repeatable


def test_severity_curves_tell_seventeen_methods_apart():
    methods = [f"method{i}" for i in range(17)]
    accuracy = {f"blur@{k}": dict.fromkeys(methods, 0.5) for k in (1, 2)}  # every line on top of the others
    (figure,) = severity_curves(accuracy).values()
    axes = figure.axes[0]
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in axes.get_lines()}
    assert len(styles) == 17 and len({line.get_color() for line in axes.get_lines()}) == 10
    figure.canvas.draw()
    legend_box = axes.get_legend().get_window_extent()
    assert legend_box.x0 >= axes.get_window_extent().x1  # the legend does not cover the lines
    close_figures({"blur": figure})


def test_histograms_have_axis_labels():
    figure = lambda_histograms({"a": np.linspace(0, 1, 9)})
    assert figure.axes[0].get_xlabel() == "λ" and figure.axes[0].get_ylabel() == "samples"
    close_figures({"h": figure})


def test_risk_coverage_draws_each_models_selective_risk_by_both_scores():
    table = random_sample_table(60, seed=4)
    figure = risk_coverage(table, "s")
    for ax, trust_of in zip(figure.axes, (lambda m: table[f"prob/{m}"], lambda m: -table["js"])):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"zeroshot", "expert"}
        for method, line in lines.items():
            correct = table[f"pred/{method}"] == table["label"]
            order = np.lexsort((np.arange(60), -trust_of(method).astype(np.float64)))
            expected = [1 - correct[order[:k]].mean() for k in range(1, 61)]
            np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-12)
            np.testing.assert_allclose(line.get_xdata(), np.arange(1, 61) / 60)
    close_figures({"risk": figure})


def test_routing_counts_each_sample_once_and_the_colour_scale_starts_at_zero():
    """Two splits with a domain expert each and a mix of both: the routing panel counts the splits' samples (the
    mix's are theirs again), each row in percent of its domain's samples."""
    a = {"index": np.arange(4), "w/t3/a": np.array([0.3, 0.3, 0.3, 0.1]), "w/t3/b": np.array([0.1, 0.1, 0.1, 0.2])}
    b = {"index": np.arange(2), "w/t3/a": np.array([0.1, 0.1]), "w/t3/b": np.array([0.2, 0.2])}
    mix = {key: np.concatenate([a[key], b[key]]) for key in a}
    routing = ExpertRouting(["a", "b"], {"split_a": "a", "split_b": "b"}, {"mix": ["split_a", "split_b"]})
    figure = expert_weights({"split_a": a, "split_b": b, "mix": mix}, routing)
    weights_panel, routing_panel = figure.axes[:2]  # then their colour bars
    assert [t.get_text() for t in routing_panel.get_yticklabels()] == ["a (4)", "b (2)"]
    np.testing.assert_allclose(routing_panel.images[0].get_array(), [[75.0, 25.0], [0.0, 100.0]])
    assert weights_panel.images[0].get_clim()[0] == 0.0 and routing_panel.images[0].get_clim() == (0.0, 100.0)
    assert "our extension" in figure.get_suptitle()  # K-expert T³ is not the paper's
    close_figures({"weights": figure})
