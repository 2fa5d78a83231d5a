"""Four experts (our extension of T³) through the command line with configs/experts.yaml on tiny models and data of
the four modalities: the splits, the columns, the per-expert records, the FusionBench summary with the normalised
accuracy, TensorBoard's per-expert scalars, and what several experts refuse."""

import json
import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import GAMMA, REPO, lambda_atol, run_cli_expecting_error, run_cli_in_process, write_modality_data
from tcube_lightning.data.modalities import MODALITIES

TEAM = {"blood": "full_a", "breast": "lora_a", "retina": "full_b", "oct": "lora_b"}
MODALITY_NAMES = list(TEAM)
SPLITS = [f"{m}_{kind}" for m in MODALITY_NAMES for kind in ("in_domain", "base_to_novel")]
METHODS = "[zeroshot, expert, ensemble, select, soup, task_arithmetic, ties, dare, t3, t3_batch, dawin_mtl]"


def experts_args(clip_pair, expert_team, root, out, *extra):
    experts = {modality: str(expert_team[name][0]) for modality, name in TEAM.items()}
    return [
        "test",
        "--config",
        str(REPO / "configs" / "experts.yaml"),
        "--model.arch=tcube-tiny-clip",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.experts={json.dumps(experts)}",
        f"--model.methods={METHODS}",
        f"--data.root={root}",
        "--data.size=28",
        "--data.image_size=28",
        "--data.num_workers=0",
        "--data.pin_memory=false",
        "--data.batch_size=8",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("four_modalities")
    for name in MODALITY_NAMES:
        m = MODALITIES[name]
        write_modality_data(root, m.medmnist_flag, (m.medimeta_dataset, m.medimeta_task), [], n=8)
    return root


@pytest.fixture(scope="module")
def four_experts(clip_pair, expert_team, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("four_experts")
    # figures: which ones several experts draw is checked in test_plots.py (drawing them here costs 15 s)
    extra = ("--model.export_samples=true", f"--model.gamma={GAMMA}", "--model.plots=false")
    return run_cli_in_process(experts_args(clip_pair, expert_team, data_root, out, *extra))


def test_four_experts_cost_five_forwards_in_their_shared_part(four_experts):
    from tcube_lightning.reporting.cost import SHARED

    cost = json.loads((four_experts[1] / "cost.json").read_text())
    assert cost[SHARED]["forward_equivalents"] == pytest.approx(5.0)  # the generalist and four experts


def test_four_experts_run_every_split_with_a_column_per_expert(four_experts):
    results, _ = four_experts
    assert list(results["accuracy"]) == [*SPLITS, "stream"]
    assert list(results["sources"]["stream"]) == [s for s in SPLITS if s.endswith("in_domain")]
    columns = list(results["accuracy"]["blood_in_domain"])
    assert columns[:6] == ["zeroshot", *(f"expert:{m}" for m in MODALITY_NAMES), "ensemble"]
    assert {"soup", "ties", "dare", "task_arithmetic", "t3", "t3_batch", "dawin_mtl"} <= set(columns)
    assert results["methods"]["t3"].startswith("T³-K (our extension of T³ to several experts)")
    assert set(results["models"]["experts"]) == set(MODALITY_NAMES)
    assert results["heads"]["mode"] == "fixed (merge_text false)"  # several experts: the generalist's head
    # each split's class names are its modality's: the four in-domain splits are four class sets in the stream
    assert len({tuple(names) for names in results["classnames"]["stream"].values()}) == 4


def test_per_expert_weights_are_recorded_and_exported(four_experts):
    results, folder = four_experts
    stats = results["coefficients"]["blood_in_domain"]
    assert set(stats["experts"]) == set(MODALITY_NAMES) and stats["generalised_js_mean"] >= 0
    samples = np.load(folder / "samples" / "blood_in_domain.npz")
    for expert in MODALITY_NAMES:
        lam, weight = samples[f"lambda/{expert}"], samples[f"w/t3/{expert}"]
        np.testing.assert_allclose(weight, lam / 4, rtol=1e-6)  # the independent rule: λ_k / K
        assert stats["experts"][expert]["weight_mean"] == pytest.approx(float(weight.astype(np.float64).mean()))
        assert samples[f"js/{expert}"].shape == lam.shape
    assert samples["js"].max() <= math.log(5) + 1e-6  # the generalised JS of five distributions
    markdown = (folder / "results.md").read_text()
    assert "## λ per split and expert (T³ with several experts, our extension)" in markdown
    assert "Decision quadrants" not in markdown  # two-model figures and tables are left out


def test_a_stream_sample_scores_what_it_scores_in_its_own_split(four_experts):
    """Per-sample methods give every sample of the mixed stream the prediction it gets in its own split."""
    _, folder = four_experts
    stream = np.load(folder / "samples" / "stream.npz")
    sources = [s for s in SPLITS if s.endswith("in_domain")]
    for position, split in enumerate(sources):
        own = np.load(folder / "samples" / f"{split}.npz")
        rows = stream["source"] == position
        order = stream["source_index"][rows]
        for column in ("pred/t3", "pred/dawin_mtl", "pred/ties"):
            np.testing.assert_array_equal(stream[column][rows], own[column][order])
        # the same forwards in other batches (another BLAS blocking): λ_k to its rounding, then divided by K
        atol = lambda_atol(GAMMA) / len(TEAM)
        np.testing.assert_allclose(stream["w/t3/blood"][rows], own["w/t3/blood"][order], atol=atol, rtol=0)


def test_the_summary_takes_fusionbenchs_layout_with_the_normalised_accuracy(four_experts):
    results, folder = four_experts
    rows = {row["method"]: row for row in json.loads((folder / "summary.json").read_text())}
    accuracy = results["accuracy"]
    t3 = rows["t3"]
    assert t3["mean"] == pytest.approx(np.mean([accuracy[s]["t3"] for s in SPLITS]))  # the mix's samples once
    normalised = results["normalised_accuracy"]
    for split in SPLITS:  # over the split's domain expert alone; undefined where that expert scored nothing
        reference = accuracy[split][f"expert:{split.split('_')[0]}"]
        if reference == 0:
            assert split not in normalised
        else:
            assert normalised[split]["t3"] == pytest.approx(accuracy[split]["t3"] / reference)
    assert len(normalised) >= 3
    # the stream: over every sample taken by its own domain expert (an oracle router)
    parts = results["sources"]["stream"]
    oracle = sum(p["num_samples"] * p["accuracy"][f"expert:{s.split('_')[0]}"] for s, p in parts.items()) / 32
    assert normalised["stream"]["t3"] == pytest.approx(accuracy["stream"]["t3"] / oracle)
    key = next(k for k in t3 if k.startswith("normalised mean"))
    valid = [v["t3"] for split, v in normalised.items() if split != "stream"]  # the mix's samples counted once
    assert key == f"normalised mean ({len(valid)} splits)" and t3[key] == pytest.approx(np.mean(valid))

    assert results["expert_of"]["blood_base_to_novel"] == "blood"


def test_tensorboard_logs_each_experts_lambda_and_weight(four_experts):
    _, folder = four_experts
    (event_folder,) = {p.parent for p in folder.parent.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_folder))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for expert in MODALITY_NAMES:
        assert f"lambda/oct_in_domain_{expert}_mean" in tags and f"lambda_t3_weight/oct_in_domain_{expert}_mean" in tags


def test_several_experts_refuse_what_only_two_models_define(clip_pair, expert_team, data_root, tmp_path, capsys):
    two_model = experts_args(clip_pair, expert_team, data_root, tmp_path, "--model.methods=[t3, slerp, t3_cluster]")
    message = run_cli_expecting_error(two_model, capsys)
    assert "['slerp', 't3_cluster'] merge the generalist with one expert" in message
    wrong = experts_args(clip_pair, expert_team, data_root, tmp_path, "--data.expert_of={'blood_*': heart}")
    assert "data.expert_of: ['heart'] are not experts of this run" in run_cli_expecting_error(wrong, capsys)
    # a split's own name wins over a pattern listed before it: blood_in_domain's entry is read, and refused
    exact = experts_args(
        clip_pair, expert_team, data_root, tmp_path, "--data.expert_of={'*': blood, blood_in_domain: heart}"
    )
    assert "data.expert_of: ['heart'] are not experts of this run" in run_cli_expecting_error(exact, capsys)
    both = [*experts_args(clip_pair, expert_team, data_root, tmp_path), f"--model.expert_checkpoint={clip_pair[1]}"]
    assert "model.expert_checkpoint and model.experts exclude each other" in run_cli_expecting_error(both, capsys)


def test_predict_with_several_experts_writes_each_experts_columns(clip_pair, expert_team, data_root, tmp_path, caplog):
    import pyarrow.parquet as pq

    experts = {modality: str(expert_team[name][0]) for modality, name in TEAM.items()}
    main_args = [
        "predict",
        "--model.arch=tcube-tiny-clip",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.experts={json.dumps(experts)}",
        f"--data.root={data_root}",
        '--data.sources={"cells": "bloodmnist.npz"}',
        "--data.flag=bloodmnist",
        "--data.image_size=28",
        f"--model.results_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    from tcube_lightning.cli.app import main

    main(main_args)
    table = pq.read_table(tmp_path / "predictions" / "cells.parquet").to_pydict()
    assert {"pred/t3", "pred/zeroshot", *(f"pred/expert:{m}" for m in TEAM), "w/t3/oct", "lambda/oct"} <= set(table)
    assert len(table["pred/t3"]) == 8 and not any(table["skipped"])
    said = [record.getMessage() for record in caplog.records]  # predict's default method is our extension here
    assert "t3: T³ with several experts, our extension of the paper" in " ".join(said)
