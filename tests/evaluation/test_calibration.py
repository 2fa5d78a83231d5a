"""A calibration split through the real command line: a seeded fraction held out of a split fixes each method's
Learn-then-Test threshold (recomputed here with SciPy from the same samples' outputs in a run that evaluates the whole
split) and conformal sets; every other split reports how the rule fared; predict applies it; bad specs refused."""

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from helpers import CLASSNAMES, cli_args, run_cli_expecting_error, run_cli_in_process
from tcube_lightning.cli.app import main
from tcube_lightning.reporting.samples import read_table

METHODS = "--model.methods=[zeroshot, expert, t3, t3_batch, t3_cluster, dawin]"
ALPHA, DELTA = 0.3, 0.2
"""Loose enough that the tiny random models' rules accept something."""


@pytest.fixture(scope="module")
def runs(clip_pair, npz_root, tmp_path_factory):
    """The same run twice: evaluating split "a" whole, and calibrating on 40 % of it (seeded) before evaluating the
    rest and "b"."""
    out = tmp_path_factory.mktemp("calibrated")
    extra = (METHODS, "--data.batch_size=8", "--model.export_samples=true", "--model.gamma=20")
    whole = run_cli_in_process(cli_args(clip_pair, npz_root, out / "whole", *extra))
    guarantee = (f"--model.guarantee.alpha={ALPHA}", f"--model.guarantee.delta={DELTA}", "--model.plots=true")
    calibrated = run_cli_in_process(
        cli_args(clip_pair, npz_root, out / "cal", *extra, "--data.calibration=a:0.4", *guarantee)
    )
    return whole, calibrated


def test_the_rule_is_fixed_on_the_held_out_samples_and_judged_on_every_split(runs):
    (_, whole_dir), (results, folder) = runs
    held = np.sort(np.random.default_rng(0).permutation(37)[:15])  # data.seed 0: round(0.4 · 37) = 15 rows of "a"
    calibration = results["calibration"]
    assert calibration["data"] == "a:0.4" and calibration["samples"] == 15
    assert results["num_samples"] == {"a": 22, "b": 21} and "calibration" not in results["accuracy"]
    table = read_table(whole_dir / "samples" / "a.npz")  # the same samples' outputs, from the run of the whole split
    for method in ("zeroshot", "t3", "dawin"):
        confidence = table[f"prob/{method}"][held].astype(np.float64)
        wrong = table[f"pred/{method}"][held] != table["label"][held]
        expected = None  # Learn then Test, written out: the least selective threshold rejected in sequence
        for threshold in np.linspace(1.0, 0.0, 201):
            accepted = confidence >= threshold
            n = int(accepted.sum())
            if n == 0 or binomtest(0, n, ALPHA, alternative="less").pvalue > DELTA:
                continue
            if binomtest(int(wrong[accepted].sum()), n, ALPHA, alternative="less").pvalue > DELTA:
                break
            expected = threshold
        ours = calibration["thresholds"][method]["confidence"]
        assert (ours is None and expected is None) or ours == pytest.approx(expected, abs=1e-12), method
    assert set(calibration["thresholds"]["t3"]) == {"confidence", "js"}  # a merging method: −JS too
    assert set(calibration["thresholds"]["zeroshot"]) == {"confidence"}
    assert set(calibration["quantiles"]["t3_cluster"]) == {"lac", "aps", "raps"}
    for split in ("a", "b"):
        exported = read_table(folder / "samples" / f"{split}.npz")
        for method, record in results["guarantee"][split].items():
            rule = record["selective"]["confidence"]
            accepted = exported[f"accepted/confidence/{method}"]
            assert rule["coverage"] == pytest.approx(accepted.mean())
            for kind in ("lac", "aps", "raps"):
                assert record["sets"][kind]["set_size"] == pytest.approx(exported[f"set_size/{kind}/{method}"].mean())
                assert exported[f"set_size/{kind}/{method}"].min() >= 1 or kind == "lac"
    summary = {row["method"]: row for row in json.loads((folder / "summary.json").read_text())}
    assert "guaranteed coverage (shift)" in summary["t3"] and "guaranteed risk (in-domain)" in summary["t3"]
    assert (folder / "plots" / "guarantee.png").is_file()
    assert "## Deferral with a guarantee" in (folder / "results.md").read_text()


def test_predict_applies_the_calibrated_rule(clip_pair, npz_root, tmp_path):
    out = tmp_path / "predict"
    args = [
        a
        for a in cli_args(clip_pair, npz_root, tmp_path)
        if not a.startswith(("--trainer.default_root_dir", "--data.sources"))
    ]
    main(
        [
            "predict",
            *args[1:],
            '--data.sources={"b": "tiny_b.npz"}',
            "--data.calibration=tiny_a.npz",
            f"--model.results_dir={out}",
        ]
    )
    header = (out / "predictions" / "b.csv").read_text().splitlines()[0].split(",")
    assert {"accepted/t3", "set/t3", "set_size/aps/t3"} <= set(header)
    rows = (out / "predictions" / "b.csv").read_text().splitlines()[1:]
    first = dict(zip(header, rows[0].split(","), strict=False))
    assert all(name in CLASSNAMES for name in first["set/t3"].split("; "))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("a", "data.calibration: 'a' is a split of the run"),
        ("a:1.5", "data.calibration: 'a:1.5' holds out 1.5 of 'a'"),
        ("val", "data.calibration: 'val' is the MedMNIST val split of the run's modality"),
        ("missing.npz", "data file not found"),
    ],
)
def test_bad_calibration_specs_are_refused_before_any_model_loads(clip_pair, npz_root, tmp_path, capsys, spec, message):
    said = run_cli_expecting_error(cli_args(clip_pair, npz_root, tmp_path, f"--data.calibration={spec}"), capsys)
    assert message in said
