"""The figures' content (what is drawn, from which numbers), read back from the matplotlib objects."""

import numpy as np

from tcube_lightning.plots import accuracy_heatmap, close_figures, lambda_histograms, run_figures, severity_curves

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
    close_figures({"heatmap": figure})


def test_lambda_histograms_count_every_sample_and_run_figures_names_them():
    lambdas = {"in_domain": np.linspace(0.4, 0.6, 50), "blur@1": np.full(7, 0.5)}  # a constant λ too
    figure = lambda_histograms(lambdas)
    counts = [sum(p.get_height() for p in ax.patches) for ax in figure.axes[:2]]
    assert counts == [50, 7]
    figures = run_figures(ACCURACY, lambdas)
    assert set(figures) == {"accuracy_heatmap", "lambda_histograms", "severity_blur"}
    close_figures({**figures, "histograms": figure})


def test_no_lambda_histogram_without_lambdas():
    figures = run_figures(ACCURACY, {})
    assert "lambda_histograms" not in figures
    close_figures(figures)


def test_severity_curves_tell_seventeen_methods_apart():
    methods = [f"method{i}" for i in range(17)]
    accuracy = {f"blur@{k}": {m: 0.5 for m in methods} for k in (1, 2)}  # every line on top of the others
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
