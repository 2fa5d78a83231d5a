"""Mixed splits through the real command line: a sample's outputs in a mix of two class sets are those of the same
sample in its own split for every output, static and per-sample method (the batch-wise and clustered ones are what a
mix changes); the mix's records per source; bad mixes named before any model loads; resume of a run with a mix."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import (
    LOGITS_ATOL,
    SPLITS,
    cli_args,
    interrupt_in_split,
    lambda_atol,
    run_cli_expecting_error,
    run_cli_in_process,
)
from tcube_lightning.cli.app import main
from tcube_lightning.data.modalities import medmnist_classnames
from tcube_lightning.reporting.samples import read_table

MIX = '--data.mixes={"m": ["a", "scans"]}'
UNCHANGED = ("zeroshot", "expert", "ensemble", "select", "wise_ft@0.5", "ties", "t3", "dawin")
"""Every output, static and per-sample method: a sample's logits do not depend on the batch it comes in."""
GAMMA = 20.0


@pytest.fixture(scope="module")
def scans(npz_root):
    """An image folder beside the npz splits: 3 classes of its own (another class set than the npz splits' 4)."""
    folder = npz_root / "scans"
    if not folder.exists():
        rng = np.random.default_rng(3)
        for i in range(14):
            name = ["bone", "lung", "skin"][i % 3]
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def mixed_args(clip_pair, npz_root, out, *extra):
    sources = json.dumps({**SPLITS, "scans": "scans"})
    methods = "--model.methods=[zeroshot, expert, ensemble, select, wise_ft, ties, t3, dawin, t3_batch, t3_cluster]"
    return [
        *[a for a in cli_args(clip_pair, npz_root, out) if not a.startswith(("--data.sources", "--data.classnames"))],
        f"--data.sources={sources}",
        "--data.flag=octmnist",  # the npz splits' 4 class names; the image folder names its own 3
        "--data.batch_size=8",
        methods,
        f"--model.gamma={GAMMA}",
        "--model.export_samples=true",
        "--model.diagnose_extremes=false",
        *extra,
    ]


def test_a_sample_scores_in_a_mix_of_two_class_sets_what_it_scores_in_its_own_split(
    clip_pair, npz_root, scans, tmp_path
):
    results, run = run_cli_in_process(mixed_args(clip_pair, npz_root, tmp_path, MIX))
    assert list(results["accuracy"]) == ["a", "b", "scans", "m"] and results["num_samples"]["m"] == 37 + 14
    assert results["classnames"]["m"] == {"a": medmnist_classnames("octmnist"), "scans": ["bone", "lung", "skin"]}
    mixed = read_table(run / "samples" / "m.npz")
    alone = {source: read_table(run / "samples" / f"{source}.npz") for source in ("a", "scans")}
    assert sorted(np.unique(mixed["source"]).tolist()) == [0, 1]
    batches = [mixed["source"][i : i + 8] for i in range(0, len(mixed["source"]), 8)]
    assert sum(len(set(b.tolist())) > 1 for b in batches) >= 4  # batches do mix the two class sets
    for position, source in enumerate(("a", "scans")):
        rows = mixed["source"] == position
        own = {name: values[mixed["source_index"][rows]] for name, values in alone[source].items()}
        np.testing.assert_array_equal(own["label"], mixed["label"][rows])
        np.testing.assert_allclose(mixed["js"][rows], own["js"], atol=2 * LOGITS_ATOL, rtol=0)
        np.testing.assert_allclose(mixed["w/t3"][rows], own["w/t3"], atol=lambda_atol(GAMMA), rtol=0)
        for method in UNCHANGED:
            np.testing.assert_allclose(mixed[f"prob/{method}"][rows], own[f"prob/{method}"], atol=LOGITS_ATOL, rtol=0)
            np.testing.assert_array_equal(mixed[f"pred/{method}"][rows], own[f"pred/{method}"], err_msg=method)
        record = results["sources"]["m"][source]
        assert record["num_samples"] == rows.sum()
        for method in UNCHANGED:
            assert record["accuracy"][method] == pytest.approx(results["accuracy"][source][method])
    # T³_B's weight: one per batch, the mean over the whole mixed batch (both class sets), as a stream forces it.
    for start in range(0, len(mixed["index"]), 8):
        batch = slice(start, start + 8)
        np.testing.assert_allclose(mixed["w/t3_batch"][batch], mixed["w/t3"][batch].mean(), rtol=1e-6)
    overall = results["metrics"]["m"]["t3"]
    assert set(overall) == {"top1", "ece", "nll"}
    correct = mixed["pred/t3"] == mixed["label"]
    assert overall["top1"] == pytest.approx(correct.mean())
    assert "## Mixed split m: each source alone and in the mix" in (run / "results.md").read_text()


def test_bad_mixes_are_named_before_any_model_loads(clip_pair, npz_root, scans, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tcube_lightning.loading.sources.load_source", lambda *a: pytest.fail("a model was loaded"))
    for mixes, message in (
        ('{"m": ["a", "c"]}', "data.mixes.m: 'c' names no split of the run; its splits: ['a', 'b', 'scans']"),
        ('{"m": []}', "data.mixes.m: an empty list"),
        ('{"a": ["b", "scans"]}', "data.mixes: 'a' is already a split of the run"),
        ('{"m": ["a", "b"], "n": ["m", "b"]}', "data.mixes.n: 'm' is a mix itself"),
        ('{"m": ["x*"]}', "data.mixes.m: 'x*' names no split of the run"),
    ):
        said = run_cli_expecting_error(mixed_args(clip_pair, npz_root, tmp_path, f"--data.mixes={mixes}"), capsys)
        assert message in said
    adapted = mixed_args(clip_pair, npz_root, tmp_path, MIX, "--model.methods=[adamerging_task]")
    said = run_cli_expecting_error(adapted, capsys)
    assert (
        "AdaMerging adapts on each split with one class set's zero-shot head" in said
        and "'m' holds samples of 2" in said
    )


def test_a_run_with_a_mix_resumes_where_it_stopped(clip_pair, npz_root, scans, tmp_path, monkeypatch):
    """Stopped in the mix, after its sources are done: resume evaluates the mix alone, from sources it skips."""
    interrupt_in_split(monkeypatch, "m")
    out = tmp_path / "results"
    args = mixed_args(clip_pair, npz_root, tmp_path, MIX, f"--model.results_dir={out}")
    with pytest.raises(SystemExit):
        main(args)
    assert json.loads((out / "results.json").read_text())["missing_splits"] == ["m"]
    monkeypatch.undo()
    resumed, _ = run_cli_in_process([*args, "--model.resume=true"])
    whole, _ = run_cli_in_process(mixed_args(clip_pair, npz_root, tmp_path / "whole", MIX))
    assert resumed["complete"] and resumed["accuracy"] == whole["accuracy"] and resumed["sources"] == whole["sources"]
