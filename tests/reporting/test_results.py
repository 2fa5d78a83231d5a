"""Results files, the summary layout, CE/mCE, split names and the run report, against hand-written values."""

import csv
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from tcube_lightning.data.splitnames import corrupted_split_name, is_corrupted, parse_corrupted
from tcube_lightning.errors import InputError
from tcube_lightning.reporting.records import SPLIT_RECORD_KEYS
from tcube_lightning.reporting.report import RunReport
from tcube_lightning.reporting.results import (
    corruption_errors,
    summary_rows,
    write_atomic,
    write_results,
    write_summary,
)
from tcube_lightning.reporting.resume import load_previous

ACCURACY = {
    "in_domain": {"zeroshot": 0.8, "t3": 0.9},
    "blur@1": {"zeroshot": 0.6, "t3": 0.7},
    "blur@2": {"zeroshot": 0.4, "t3": 0.6},
    "noise@1": {"zeroshot": 1.0, "t3": 0.5},
}


def test_split_names_are_formed_and_read_in_one_place():
    assert corrupted_split_name("motion_blur", 3) == "motion_blur@3"
    assert parse_corrupted("motion_blur@3") == ("motion_blur", 3)
    for plain in ("in_domain", "hospital@b", "@2", "x@"):
        assert parse_corrupted(plain) is None and not is_corrupted(plain)


def test_corruption_errors_follow_the_imagenet_c_formula():
    errors = corruption_errors(ACCURACY, "zeroshot")
    blur = ((1 - 0.7) + (1 - 0.6)) / ((1 - 0.6) + (1 - 0.4))
    assert errors["t3"]["blur"] == pytest.approx(blur)
    assert math.isnan(errors["t3"]["noise"])  # the reference makes no error there
    assert math.isnan(errors["t3"]["mCE"])
    assert errors["zeroshot"]["blur"] == pytest.approx(1.0)
    assert corruption_errors({"in_domain": ACCURACY["in_domain"]}, "zeroshot") == {}


def test_summary_rows_and_files(tmp_path):
    rows = summary_rows(ACCURACY, {"t3": {"mCE": 0.75}, "zeroshot": {"mCE": 1.0}})
    assert rows[1] == {"method": "t3", "in_domain": 0.9, "corrupted_mean": pytest.approx(0.6), "mCE": 0.75}
    write_summary(tmp_path, rows)
    with open(tmp_path / "summary.csv") as handle:
        read = list(csv.DictReader(handle))
    assert [r["method"] for r in read] == ["zeroshot", "t3"] and float(read[1]["corrupted_mean"]) == pytest.approx(0.6)
    assert "| t3 | 90.00 | 60.00 | 0.750 |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())[0]["mCE"] == 1.0


def test_means_over_fewer_splits_than_the_run_has_say_so(tmp_path):
    """An interrupted run: its corrupted mean and mCE come from the splits done, which their names say, and the
    summary names the splits missing."""
    missing = ["blur@3", "noise@3", "base_to_novel"]
    rows = summary_rows(ACCURACY, {"t3": {"mCE": 0.75}}, missing=missing)
    assert set(rows[1]) == {"method", "in_domain", "corrupted_mean (3 of 5 splits)", "mCE (3 of 5 splits)"}
    write_summary(tmp_path, rows, missing)
    text = (tmp_path / "summary.md").read_text()
    assert "| method | in_domain | corrupted_mean (3 of 5 splits) | mCE (3 of 5 splits) |" in text
    assert "Missing splits (not evaluated yet, left out of every mean): blur@3, noise@3, base_to_novel" in text


def test_results_files_are_readable_like_other_files(tmp_path):
    previous = os.umask(0o022)
    try:
        write_atomic(tmp_path / "results.json", "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "good\n")
    with pytest.raises(TypeError):
        write_atomic(path, 42)  # fails while writing
    assert path.read_text() == "good\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def record(accuracy: dict[str, float]) -> dict:
    base = {key: {} for key in SPLIT_RECORD_KEYS}
    base.update(accuracy=accuracy, num_samples=10, nonfinite_samples=0)
    base["coefficients"] = {"lambda_min": 0.4, "lambda_mean": 0.5, "lambda_max": 0.6, "js_mean": 0.1}
    base["diagnostics"] = {"quadrants": {}}
    return base


def test_results_markdown_lists_each_grid_setting_and_each_quadrants_correlation(tmp_path):
    results = {key: {} for key in SPLIT_RECORD_KEYS} | {"num_samples": {"a": 7}}
    grid = {"gamma=8": {"lambda_min": 0.5, "lambda_mean": 0.7, "lambda_max": 0.99, "lambda_spread": 0.49}}
    run = {"lambda_min": 0.5, "lambda_mean": 0.52, "lambda_max": 0.58, "lambda_spread": 0.08, "js_mean": 0.1}
    results["coefficients"]["a"] = run | {"grid": grid}
    cells = {"both wrong": (2, 0.3, -0.25), "only expert right": (1, 0.2, None)}
    quadrants = {name: {"count": n, "js_mean": js, "pearson_js_dawin": rho} for name, (n, js, rho) in cells.items()}
    results["diagnostics"]["a"] = {"quadrants": quadrants}
    _, markdown_path = write_results(tmp_path, results)
    markdown = markdown_path.read_text()
    assert "| a | run | 7 | 0.5000 | 0.5200 | 0.5800 | 0.1000 |" in markdown
    assert "| a | gamma=8 | 7 | 0.5000 | 0.7000 | 0.9900 | 0.1000 |" in markdown  # JS is shared by the settings
    assert "| both wrong | 2 | 0.3000 | -0.250 |" in markdown and "| only expert right | 1 | 0.2000 | – |" in markdown


def test_the_report_writes_every_finished_split_in_protocol_order(tmp_path):
    config = {"model": {"gamma": 0.5}, "data": {"root": "x"}}
    report = RunReport(tmp_path, ["in_domain", "blur@1", "blur@2"], {"zeroshot": "alone"}, config, "zeroshot")
    report.add_split("blur@2", record({"zeroshot": 0.4}), {"index": np.arange(2), "lambda": np.array([0.4, 0.6])})
    first = json.loads((tmp_path / "results.json").read_text())
    assert list(first["accuracy"]) == ["blur@2"] and first["config"] == config
    report.add_split("in_domain", record({"zeroshot": 0.8}), {"index": np.arange(1), "lambda": np.array([0.5])})
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written["accuracy"]) == ["in_domain", "blur@2"]  # protocol order, not finishing order
    assert written["corruption_errors"]["ce"]["zeroshot"]["blur"] == pytest.approx(1.0)
    assert written["missing_splits"] == ["blur@1"] and written["complete"] is False
    assert set(written) == {
        *SPLIT_RECORD_KEYS,
        "methods",
        "config",
        "missing_splits",
        "partial_splits",
        "complete",
        "corruption_errors",
    }
    # An earlier run's records, and each split's per-sample table, read back for resume, are the ones written.
    previous = load_previous(tmp_path, config)
    assert previous["in_domain"]["accuracy"] == {"zeroshot": 0.8} and list(previous) == ["in_domain", "blur@2"]
    assert previous["blur@2"].table["lambda"].tolist() == [0.4, 0.6]


def test_resume_compares_only_what_changes_the_numbers(tmp_path, monkeypatch):
    config = {
        "model": {"gamma": 0.5, "results_dir": str(tmp_path), "plots": True},
        "data": {"root": "data", "num_workers": 0},
    }
    report = RunReport(tmp_path, ["a"], {}, config, "zeroshot")
    report.add_split("a", record({"zeroshot": 0.5}), {"index": np.arange(1), "lambda": np.array([0.5])})
    monkeypatch.chdir(tmp_path)
    moved = {
        "model": {"gamma": 0.5, "results_dir": "elsewhere", "plots": False},
        "data": {"root": str(tmp_path / "data"), "num_workers": 4},  # the same root, given absolute
    }
    assert list(load_previous(tmp_path, moved)) == ["a"]
    with pytest.raises(InputError, match=r"another configuration \(differs in \['model.gamma'\]\)"):
        load_previous(tmp_path, {**moved, "model": {**moved["model"], "gamma": 2.0}})
    assert load_previous(tmp_path / "elsewhere", moved) == {}


@pytest.mark.parametrize(
    "content,message",
    [
        ("[1, 2]", "holds a list, not a tcube-lightning results object"),
        ('{"config": {}, "accuracy": {}}', r"lacks \['metrics'"),
        (
            '{"config": {}, "accuracy": {"a": {}}' + "".join(f', "{k}": {{}}' for k in SPLIT_RECORD_KEYS[1:]) + "}",
            r"lacks \[\"metrics\['a'\]\"",
        ),
        ("{not json", "is not valid JSON"),
    ],
    ids=["list", "missing-keys", "missing-split", "not-json"],
)
def test_resume_reads_only_a_results_file_it_understands(tmp_path, content, message):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(InputError, match=message):
        load_previous(tmp_path, {"model": {}, "data": {}})


def test_cost_per_image_and_forward_equivalents_from_measured_seconds():
    from tcube_lightning.reporting.cost import SHARED, CostMeter

    meter = CostMeter(torch.device("cpu"))
    with meter.measure("t3", 5):
        pass
    with meter.measure(None, 5):  # a part that does not run: not in the table
        pass
    meter.seconds.update({SHARED: 2.0, "t3": 3.0})  # as if measured: 10 images each
    meter.images.update({SHARED: 10, "t3": 10})
    table = meter.table()
    assert table[SHARED] == {"ms_per_image": pytest.approx(200.0), "forward_equivalents": pytest.approx(2.0)}
    assert table["t3"] == {"ms_per_image": pytest.approx(300.0), "forward_equivalents": pytest.approx(3.0)}
    assert set(table) == {SHARED, "t3"}
    meter.models = 5  # four experts and the generalist: the shared part is five forwards
    assert meter.table()[SHARED]["forward_equivalents"] == pytest.approx(5.0)
