"""Deferral (selective classification) against an independent NumPy computation of its definition: for every k,
the k samples a score trusts most (ties in the split's order) and their error rate; through the command line, from
the exported per-sample table."""

import math

import numpy as np
import pytest

from helpers import cli_args, run_cli_in_process
from tcube_lightning.reporting.deferral import COVERAGES, coverage_columns, deferral
from tcube_lightning.reporting.samples import read_table


def numpy_deferral(trust: np.ndarray, correct: np.ndarray) -> tuple[float, dict[str, float]]:
    """AURC and the accuracy at each coverage, by brute force: the first k in (trust descending, index) order."""
    n = len(trust)
    order = np.lexsort((np.arange(n), -trust))
    risks = [1.0 - correct[order[:k]].mean() for k in range(1, n + 1)]
    kept = {f"{c:g}": float(correct[order[: math.ceil(c * n)]].mean()) for c in COVERAGES}
    return float(np.mean(risks)), kept


def random_table(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    return {
        "index": np.arange(n),
        "label": labels,
        "js": np.round(rng.random(n), 2).astype(np.float32),  # rounded: many ties
        "pred/a": np.where(rng.random(n) < 0.7, labels, (labels + 1) % 3),
        "prob/a": np.round(rng.random(n), 1).astype(np.float32),
        "pred/b": rng.integers(0, 3, n),
        "prob/b": rng.random(n).astype(np.float32),
    }


@pytest.mark.parametrize("n", [1, 7, 250])
def test_aurc_and_accuracy_at_coverage_match_numpy(n):
    table = random_table(n, seed=n)
    record = deferral(table, ["a", "b"])
    for method in ("a", "b"):
        correct = table[f"pred/{method}"] == table["label"]
        for score, trust in (("confidence", table[f"prob/{method}"]), ("js", -table["js"])):
            aurc, kept = numpy_deferral(trust.astype(np.float64), correct)
            assert record[method][score]["aurc"] == pytest.approx(aurc, abs=1e-12)
            assert record[method][score]["accuracy_at"] == pytest.approx(kept, abs=1e-12)
    places = coverage_columns(table, ["a", "b"])
    for method, trust in (("a", table["prob/a"]), ("js", -table["js"])):
        order = np.lexsort((np.arange(n), -trust.astype(np.float64)))
        np.testing.assert_array_equal(places[f"coverage/{method}"][order], np.arange(1, n + 1) / n)


def test_the_run_reports_what_its_exported_samples_give(clip_pair, npz_root, tmp_path):
    extra = ("--model.methods=[zeroshot, t3, t3_batch]", "--model.export_samples=true", "--data.batch_size=8")
    results, run = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
    for split in ("a", "b"):
        table = read_table(run / "samples" / f"{split}.npz")
        for method in ("zeroshot", "t3", "t3_batch"):
            correct = table[f"pred/{method}"] == table["label"]
            for score, trust in (("confidence", table[f"prob/{method}"]), ("js", -table["js"])):
                aurc, kept = numpy_deferral(trust.astype(np.float64), correct)
                reported = results["deferral"][split][method][score]
                assert reported["aurc"] == pytest.approx(aurc, abs=1e-12)
                assert reported["accuracy_at"] == pytest.approx(kept, abs=1e-12)
    markdown = (run / "results.md").read_text()
    assert "## Deferral: a" in markdown and "| t3 |" in markdown.split("## Deferral: a")[1]
    summary = (run / "summary.csv").read_text().splitlines()[0]
    assert summary.endswith(",AURC,AURC (JS)")
