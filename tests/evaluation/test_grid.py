"""A settings grid in one pass, against separate runs with those settings, and the opt-in per-sample export.

Both runs use exact zero-shot heads and the per-sample loop: the grid run's interpolated heads would span the
union of both settings' weights, so its heads (not its maths) would differ from the separate run's by rounding.
"""

import json
import re
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch
from scipy.stats import pearsonr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import CLASSNAMES, FRACTION_ATOL, GAMMA, SPLITS, cli_args, rounding_atol, run_cli_in_process
from tcube_lightning.engine.torch_engine import TCubeEngine
from tcube_lightning.reporting.diagnostics import QUADRANTS
from tcube_lightning.reporting.samples import read_table, read_tables

SETTING = "gamma=4,lambda_weights=pretrained"
RHO_ATOL = rounding_atol(1.0, torch.float64)
"""ρ in [−1, 1], computed twice in float64 from the same float32 values: sums in another order."""
GRID_METHODS = ("t3", "t3_batch", "t3_cluster")
COMMON = (
    "--data.batch_size=8",
    "--model.methods=[zeroshot, expert, t3, t3_batch, t3_cluster]",
    "--model.heads=exact",
    "--model.samplewise=loop",
    "--model.export_samples=true",
    "--model.plots=false",
)


def run_counting_image_forwards(args: list[str]) -> tuple[dict, object, int]:
    """The run, and how many images went through the pretrained and expert models' image towers."""
    images, shared_models = Counter(), []
    encode_image, prepare = open_clip.model.CLIP.encode_image, TCubeEngine.prepare

    def counting_encode_image(model, batch, *args, **kwargs):
        images[id(model)] += len(batch)
        return encode_image(model, batch, *args, **kwargs)

    def recording_prepare(engine, *args, **kwargs):
        shared_models.extend([engine.store.pretrained, engine.store.expert_model(0)])
        return prepare(engine, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(open_clip.model.CLIP, "encode_image", counting_encode_image)
        patch.setattr(TCubeEngine, "prepare", recording_prepare)
        results, folder = run_cli_in_process(args)
    return results, folder, sum(images[id(model)] for model in shared_models)


@pytest.fixture(scope="module")
def grid_run(clip_pair, npz_root, tmp_path_factory):
    """γ = 20 (λ weighting the expert) and, in the same pass, γ = 4 with λ weighting the generalist."""
    grid = "--model.grid=[{gamma: 4, lambda_weights: pretrained}]"
    out = tmp_path_factory.mktemp("grid")
    return run_counting_image_forwards(cli_args(clip_pair, npz_root, out, f"--model.gamma={GAMMA}", grid, *COMMON))


@pytest.fixture(scope="module")
def separate_run(clip_pair, npz_root, tmp_path_factory):
    """The grid's setting as the run's own."""
    setting = ("--model.gamma=4", "--model.lambda_weights=pretrained")
    return run_counting_image_forwards(cli_args(clip_pair, npz_root, tmp_path_factory.mktemp("one"), *setting, *COMMON))


def test_grid_columns_equal_a_separate_run_with_that_setting(grid_run, separate_run):
    grid, separate = grid_run[0], separate_run[0]
    for split in SPLITS:
        for method in GRID_METHODS:
            assert grid["metrics"][split][f"{method}[{SETTING}]"] == separate["metrics"][split][method]
        assert grid["clusters"][split][f"t3_cluster[{SETTING}]"] == separate["clusters"][split]["t3_cluster"]
        statistics = {k: v for k, v in separate["coefficients"][split].items() if k != "js_mean"}
        assert grid["coefficients"][split]["grid"] == {SETTING: statistics}
        assert statistics["lambda_spread"] == statistics["lambda_max"] - statistics["lambda_min"] > 0
        # The run's own columns are still its own: γ = 20 spreads λ more than γ = 4.
        assert grid["coefficients"][split]["lambda_spread"] > statistics["lambda_spread"]
        assert grid["metrics"][split]["zeroshot"] == separate["metrics"][split]["zeroshot"]
    assert grid["methods"][f"t3[{SETTING}]"].endswith(f"({SETTING})")
    # Sample by sample: the grid's λ, weights, predictions and probabilities are the separate run's own.
    for split in SPLITS:
        ours, theirs = (read_table(run[1] / "samples" / f"{split}.npz") for run in (grid_run, separate_run))
        pairs = {
            f"lambda[{SETTING}]": "lambda",
            **{f"{kind}/{m}[{SETTING}]": f"{kind}/{m}" for m in GRID_METHODS for kind in ("w", "pred", "prob")},
        }
        for column, own in pairs.items():
            np.testing.assert_array_equal(ours[column], theirs[own], err_msg=column)


def test_the_grid_adds_no_pretrained_or_expert_forward(grid_run, separate_run):
    samples = 37 + 21
    assert grid_run[2] == separate_run[2] == 2 * samples  # one pretrained and one expert pass per image


def test_the_grid_reaches_the_summary_and_tensorboard(grid_run):
    folder = grid_run[1]
    rows = {row["method"] for row in json.loads((folder / "summary.json").read_text())}
    assert {f"{m}[{SETTING}]" for m in GRID_METHODS} <= rows
    events = EventAccumulator(str(folder))
    events.Reload()
    setting = re.sub(r"[^0-9A-Za-z_.]+", "_", SETTING)
    assert {f"lambda/a_{setting}_mean", "lambda/a_mean", "top1/a/t3"} <= set(events.Tags()["scalars"])


def test_the_export_holds_every_sample_in_order_with_each_methods_values(grid_run, npz_root):
    results, folder, _ = grid_run
    analysis = read_tables(folder / "analysis.npz")
    for split, file in SPLITS.items():
        exported = read_table(folder / "samples" / f"{split}.npz")
        labels = np.load(npz_root / file)["test_labels"][:, 0]
        np.testing.assert_array_equal(exported["index"], np.arange(len(labels)))
        np.testing.assert_array_equal(exported["label"], labels)
        for name, values in analysis[split].items():  # the analysis columns, written separately, agree
            np.testing.assert_array_equal(exported[name], values)
        np.testing.assert_array_equal(exported["w/t3"], exported["lambda"])  # λ weights the expert
        np.testing.assert_array_equal(exported[f"w/t3[{SETTING}]"], np.float32(1) - exported[f"lambda[{SETTING}]"])
        for method in results["accuracy"][split]:
            predicted, probability = exported[f"pred/{method}"], exported[f"prob/{method}"]
            top1 = float(np.mean(predicted == labels))
            assert top1 == pytest.approx(results["accuracy"][split][method], abs=FRACTION_ATOL)
            assert ((probability >= 1 / len(CLASSNAMES)) & (probability <= 1)).all()
        batch_means = [exported["w/t3"][i : i + 8].mean() for i in range(0, len(labels), 8)]
        np.testing.assert_allclose(exported["w/t3_batch"][::8], batch_means, rtol=0, atol=FRACTION_ATOL)
        # The paper's Figure 2 statistic in results.json: Pearson's ρ of JS and DaWin's ratio over each quadrant.
        pt_right, ft_right = exported["pred/zeroshot"] == labels, exported["pred/expert"] == labels
        compared = 0
        for name, rows in zip(
            QUADRANTS, (~pt_right & ~ft_right, ~pt_right & ft_right, pt_right & ~ft_right, pt_right & ft_right)
        ):
            cell = results["diagnostics"][split]["quadrants"][name]
            assert cell["count"] == rows.sum()
            if rows.sum() > 2:
                js, dawin = (exported[c][rows].astype(np.float64) for c in ("js", "w/dawin"))
                assert cell["pearson_js_dawin"] == pytest.approx(pearsonr(js, dawin).statistic, abs=RHO_ATOL)
                compared += 1
        assert compared >= 1  # the tiny pair leaves some quadrants nearly empty
        means = np.float32(results["clusters"][split]["t3_cluster"]["means"])
        assert set(np.unique(exported["w/t3_cluster"])) <= set(means)  # each sample at its component's mean
