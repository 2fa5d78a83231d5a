"""The command line end to end on a tiny model pair and tiny npz splits, checked against independent oracles."""

import json
import re
from importlib import metadata

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image
from scipy.spatial.distance import jensenshannon
from scipy.special import expit, softmax
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from helpers import (
    ARCH,
    CLASSNAMES,
    FRACTION_ATOL,
    GAMMA,
    JS_ATOL,
    ONE_FULL_EXPERT,
    REPO,
    SPLITS,
    cli_args,
    lambda_atol,
    oracle_predictions,
    run_cli_expecting_error,
    run_cli_in_process,
    write_hub_cache,
    write_medmnist_npz,
)
from tcube_lightning.cli.app import TCubeCLI, main
from tcube_lightning.cli.entry import main as entry_main
from tcube_lightning.engine import torch_engine as engine
from tcube_lightning.engine.per_sample import per_sample_loop
from tcube_lightning.merging.batch_rules import m3_weight
from tcube_lightning.merging.coefficients import fit_beta_mixture
from tcube_lightning.merging.methods import METHOD_FAMILIES
from tcube_lightning.reporting import report
from tcube_lightning.reporting.cost import DIAGNOSTICS, SHARED
from tcube_lightning.reporting.samples import read_tables

LAMBDA_ATOL = lambda_atol(GAMMA)


def test_results_match_open_clip_oracles(batch8_run, clip_pair, npz_root):
    results, _ = batch8_run
    assert results["num_samples"] == {"a": 37, "b": 21}
    assert results["classnames"] == {"a": CLASSNAMES, "b": CLASSNAMES}
    for split, file in SPLITS.items():
        logits, labels = oracle_predictions(clip_pair, npz_root, file, [0.0, 0.5, 1.0])
        p_pt, p_ft = softmax(logits[0.0], -1), softmax(logits[1.0], -1)
        acc = results["accuracy"][split]
        assert acc["zeroshot"] == pytest.approx(np.mean(logits[0.0].argmax(1) == labels), abs=FRACTION_ATOL)
        assert acc["expert"] == pytest.approx(np.mean(logits[1.0].argmax(1) == labels), abs=FRACTION_ATOL)
        assert acc["wise_ft@0.5"] == pytest.approx(np.mean(logits[0.5].argmax(1) == labels), abs=FRACTION_ATOL)
        assert acc["ensemble"] == pytest.approx(np.mean((p_pt + p_ft).argmax(1) == labels), abs=FRACTION_ATOL)
        # T³ sample-wise: λ from JS (λ in [0, 1] by default, λ weights the pretrained model by default).
        lam = expit(GAMMA * jensenshannon(p_pt, p_ft, axis=-1) ** 2)
        assert lam.max() - lam.min() > 0.05
        w = np.round(lam, 6)  # λ weights the expert by default (T³'s Figure 4 and code)
        per_weight, _ = oracle_predictions(clip_pair, npz_root, file, w.tolist())
        t3_pred = np.array([per_weight[wi][i].argmax() for i, wi in enumerate(w)])
        assert acc["t3"] == pytest.approx(np.mean(t3_pred == labels), abs=FRACTION_ATOL)
        # Static merges that are linear in θ: task arithmetic (scale 0.5 by default) and M³ (seeded weight).
        assert acc["task_arithmetic"] == pytest.approx(acc["wise_ft@0.5"], abs=1e-9)
        m3_logits, _ = oracle_predictions(clip_pair, npz_root, file, [m3_weight(0)])
        assert acc["m3"] == pytest.approx(np.mean(m3_logits[m3_weight(0)].argmax(1) == labels), abs=FRACTION_ATOL)
        # Confidence selection and DaWin's entropy ratio (temperatures 1 for this architecture).
        pick_ft = p_ft.max(1) > p_pt.max(1)
        assert acc["select"] == pytest.approx(np.mean(np.where(pick_ft, p_ft.argmax(1), p_pt.argmax(1)) == labels))
        h_pt, h_ft = -(p_pt * np.log(p_pt)).sum(1), -(p_ft * np.log(p_ft)).sum(1)
        w_dawin = np.round(np.exp(-h_ft) / (np.exp(-h_pt) + np.exp(-h_ft)), 6)
        per_weight, _ = oracle_predictions(clip_pair, npz_root, file, w_dawin.tolist())
        dawin_pred = np.array([per_weight[wi][i].argmax() for i, wi in enumerate(w_dawin)])
        assert acc["dawin"] == pytest.approx(np.mean(dawin_pred == labels), abs=FRACTION_ATOL)
        # Clustered T³: the Beta mixture (tested on its own) groups the weights; one oracle model per component.
        mixture = fit_beta_mixture(torch.tensor(lam), components=3)
        component_weights = mixture.means.numpy()[mixture.assign(torch.tensor(lam)).numpy()]
        per_component, _ = oracle_predictions(clip_pair, npz_root, file, component_weights.tolist())
        cluster_pred = np.array([per_component[wi][i].argmax() for i, wi in enumerate(component_weights)])
        assert acc["t3_cluster"] == pytest.approx(np.mean(cluster_pred == labels), abs=FRACTION_ATOL)
        means = results["clusters"][split]["t3_cluster"]["means"]
        assert means == pytest.approx(mixture.means.tolist(), abs=LAMBDA_ATOL)
        # Decision quadrants and the prediction flips between λ_min (w = 0: pretrained) and λ_max (w = 1: expert).
        diag = results["diagnostics"][split]
        js = jensenshannon(p_pt, p_ft, axis=-1) ** 2
        pt_right, ft_right = p_pt.argmax(1) == labels, p_ft.argmax(1) == labels
        for name, mask in (("both right", pt_right & ft_right), ("only expert right", ~pt_right & ft_right)):
            assert diag["quadrants"][name]["count"] == int(mask.sum())
            if mask.any():
                assert diag["quadrants"][name]["js_mean"] == pytest.approx(js[mask].mean(), abs=JS_ATOL)
        assert sum(q["count"] for q in diag["quadrants"].values()) == len(labels)
        assert diag["flips_between_lambda_extremes"] == int((p_pt.argmax(1) != p_ft.argmax(1)).sum())
        stats = results["coefficients"][split]
        assert stats["lambda_min"] == pytest.approx(lam.min(), abs=LAMBDA_ATOL)
        assert stats["lambda_max"] == pytest.approx(lam.max(), abs=LAMBDA_ATOL)
        assert stats["lambda_mean"] == pytest.approx(lam.mean(), abs=LAMBDA_ATOL)


def test_batch_size_does_not_change_sample_wise_results(batch8_run, clip_pair, npz_root, tmp_path):
    results8, _ = batch8_run
    # The methods whose batches could matter: per sample (one merge each), per batch, clustered over the split.
    methods = "--model.methods=[zeroshot, t3, t3_batch, dawin, t3_cluster]"
    results1, _ = run_cli_in_process(
        cli_args(clip_pair, npz_root, tmp_path, "--data.batch_size=1", f"--model.gamma={GAMMA}", methods)
    )
    for split in SPLITS:
        for method in ("zeroshot", "t3", "dawin", "t3_cluster"):
            assert results1["accuracy"][split][method] == pytest.approx(results8["accuracy"][split][method], abs=1e-9)
        # With one sample per batch, the batch mean is the sample's own λ: T³_B equals T³.
        assert results1["accuracy"][split]["t3_batch"] == pytest.approx(results1["accuracy"][split]["t3"], abs=1e-9)


def test_results_markdown_and_tensorboard_tags(batch8_run):
    _, run_dir = batch8_run
    cost = json.loads((run_dir / "cost.json").read_text())  # what each method cost, beside the results
    assert set(batch8_run[0]["accuracy"]["a"]) | {SHARED, DIAGNOSTICS} == set(cost)
    assert cost[SHARED]["forward_equivalents"] == pytest.approx(2.0)
    assert all(row["ms_per_image"] > 0 for row in cost.values())
    markdown = (run_dir / "results.md").read_text()
    assert "| method | a | b |" in markdown and "| t3_batch |" in markdown
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    histograms = set(events.Tags()["histograms"])
    for split, batches in (("a", 5), ("b", 3)):  # per batch, λ's group first (TensorBoard sorts groups by name)
        for tag in ("lambda/{}_mean", "lambda/{}_min", "lambda/{}_max", "lambda_js/{}_mean", "lambda_js/{}_max"):
            assert len(events.Scalars(tag.format(split))) == batches
        assert {f"lambda/{split}", f"lambda_js/{split}"} <= histograms
        for method in ("t3", "t3_batch", "zeroshot", "expert"):  # the headline metrics, beside the settings
            (event,) = events.Scalars(f"top1/{split}/{method}")
            assert event.value == pytest.approx(batch8_run[0]["accuracy"][split][method])
    scalars = set(events.Tags()["scalars"])
    assert not [tag for tag in scalars if re.search(r"[^0-9A-Za-z_./]", tag)]  # no spaces, colons or brackets
    assert {tag.split("/")[0] for tag in scalars} == {"lambda", "lambda_js", "top1"}  # no chart per cost figure
    # The HPARAMS tab: the run's method settings, and its headline metrics as the columns to compare runs by.
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["gamma"].number_value == GAMMA
    assert start.session_start_info.hparams["lambda_weights"].string_value == "expert"
    assert "batch_size" in start.session_start_info.hparams and "classnames" not in start.session_start_info.hparams
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"top1/a/t3", "top1/b/t3_batch"} <= {m.name.tag for m in experiment.metric_infos}
    assert f"gamma: {GAMMA}" in (run_dir / "hparams.yaml").read_text()  # the same settings on disk
    texts = set(events.Tags()["tensors"])  # the run's tables as text panels: results and cost
    assert {"results/text_summary", "cost/text_summary"} <= texts


def test_generalist_given_as_a_pretrained_tag_from_the_local_cache(
    batch8_run, clip_pair, npz_root, tmp_path, monkeypatch
):
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, {"cached": {"hf_hub": "tcube/tiny-clip/"}})
    write_hub_cache(tmp_path / "hub", "tcube/tiny-clip", clip_pair[0])
    extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", "--model.methods=[zeroshot, t3]")
    extra += ("--model.pretrained_checkpoint=cached", f"--model.cache_dir={tmp_path / 'hub'}")
    results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "run", *extra))
    for split in SPLITS:
        for method in ("zeroshot", "t3"):
            assert results["accuracy"][split][method] == batch8_run[0]["accuracy"][split][method]


def test_normalisation_must_match_the_pretrained_tag(clip_pair, npz_root, tmp_path, monkeypatch, capsys):
    half = {"hf_hub": "tcube/tiny-clip/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, ARCH, {"siglip_like": half})
    write_hub_cache(tmp_path / "hub", "tcube/tiny-clip", clip_pair[0])
    extra = ("--model.pretrained_checkpoint=siglip_like", f"--model.cache_dir={tmp_path / 'hub'}")
    extra += ("--model.methods=[zeroshot]",)
    with pytest.raises(SystemExit) as stop:
        run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "default", *extra))
    assert stop.value.code == 2
    assert "trained with mean [0.5, 0.5, 0.5] and std [0.5, 0.5, 0.5]: give --data.mean" in capsys.readouterr().err
    extra += ("--data.mean=[0.5, 0.5, 0.5]", "--data.std=[0.5, 0.5, 0.5]")
    results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "matching", *extra))
    for split, file in SPLITS.items():
        logits, labels = oracle_predictions(clip_pair, npz_root, file, [0.0], mean=half["mean"], std=half["std"])
        assert results["accuracy"][split]["zeroshot"] == pytest.approx(np.mean(logits[0.0].argmax(1) == labels))


def test_compiled_forwards_give_the_same_results(batch8_run, clip_pair, npz_root, tmp_path, monkeypatch):
    # Dynamo traces the run's functions as it does for inductor (graph breaks, guards, dynamic shapes) and runs the
    # graphs it captures; AOTAutograd's and inductor's code generation (half a minute here) are torch's to test.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compile_(function, backend="eager", **options))
    extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", "--model.methods=[zeroshot, t3, t3_batch]")
    extra += ("--model.compile=true", "--model.samplewise=vectorized", '--data.sources={"a": "tiny_a.npz"}')
    extra += ("--model.diagnose_extremes=false",)  # its merged forwards would add 5 s of compiling, nothing new
    results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
    for split in ("a",):  # one split: the compiled functions are the same for every split
        for method in ("zeroshot", "t3", "t3_batch"):
            assert results["accuracy"][split][method] == batch8_run[0]["accuracy"][split][method]
        assert results["coefficients"][split] == pytest.approx(batch8_run[0]["coefficients"][split], abs=LAMBDA_ATOL)


def test_bf16_autocast_runs_every_path_with_coefficients_in_float32(
    batch8_run, clip_pair, npz_root, tmp_path, monkeypatch
):
    autocast_states = []  # per-sample merges (T³ and pass 2 of t3_cluster, which may run from an epoch hook)

    def recording_loop(*args):
        autocast_states.append(torch.is_autocast_enabled("cpu"))
        return per_sample_loop(*args)

    monkeypatch.setattr(engine, "per_sample_loop", recording_loop)
    extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", "--trainer.precision=bf16-mixed")
    extra += ("--model.methods=[zeroshot, expert, t3, t3_batch, t3_cluster, ties]", "--model.samplewise=loop")
    results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
    assert len(autocast_states) == 2 * 8 and all(autocast_states)  # 5 + 3 batches, T³ and t3_cluster each
    for split, file in SPLITS.items():
        # bf16 logits move the coefficients by about bf16's resolution, not more; λ keeps its fp32 resolution
        expected = batch8_run[0]["coefficients"][split]
        assert results["coefficients"][split] == pytest.approx(expected, abs=0.02)
        assert results["coefficients"][split]["lambda_mean"] != expected["lambda_mean"]  # autocast was on
        logits, labels = oracle_predictions(clip_pair, npz_root, file, [0.0])
        agreement = results["accuracy"][split]["zeroshot"] - np.mean(logits[0.0].argmax(1) == labels)
        assert abs(agreement) <= 2 / len(labels)  # at most two near-ties decided differently


def test_exact_and_interpolated_heads_give_the_same_results(batch8_run, clip_pair, npz_root, tmp_path):
    extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", "--model.methods=[t3, t3_batch, dawin, xent]")
    exact, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra, "--model.heads=exact"))
    for split in SPLITS:
        for method in ("t3", "t3_batch", "dawin", "xent"):
            assert exact["accuracy"][split][method] == batch8_run[0]["accuracy"][split][method]
    assert exact["heads"] == {"mode": "exact"}
    (fit,) = batch8_run[0]["heads"]["class_sets"]  # one class set; ratio methods: w in [0, 1]
    assert fit["interval"] == pytest.approx([0.0, 1.0], abs=1e-5) and fit["max_logit_deviation"] <= 1e-4
    assert fit["nodes"] in (5, 9, 17, 33) and fit["text_passes"] >= fit["nodes"]


def test_the_sample_wise_path_taken_is_recorded(batch8_run, clip_pair, npz_root, tmp_path, caplog):
    assert batch8_run[0]["samplewise"] == {"path": "vectorized", "pass": ONE_FULL_EXPERT}
    extra = ("--model.methods=[t3]", '--data.sources={"a": "tiny_a.npz"}', "--model.heads=exact")
    results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
    assert results["samplewise"] == {"path": "loop", "reason": "exact heads on CPU"}
    assert any("T³ sample-wise: the loop (exact heads on CPU)" in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("error:No seed found")  # Lightning's fallback seed, a warning before every run
def test_method_selection(clip_pair, npz_root, tmp_path, caplog, monkeypatch):
    results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, "--model.methods=[zeroshot, t3_batch]"))
    assert list(results["accuracy"]["a"]) == ["zeroshot", "t3_batch"]
    assert "flips_between_lambda_extremes" not in results["diagnostics"]["a"]
    args = cli_args(clip_pair, npz_root, tmp_path / "one", "--model.methods=zeroshot")
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # where Lightning keeps an earlier run's seed, as its default
    one, folder = run_cli_in_process([a for a in args if not a.startswith("--seed_everything")])
    assert list(one["accuracy"]["a"]) == ["zeroshot"]  # one family without brackets
    assert not [r for r in caplog.records if r.getMessage().startswith("💡 Tip")]  # Lightning's advertisements
    assert yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"] == 0  # without a seed given


def test_the_list_of_commands_names_every_command_and_a_wrong_one_is_refused(capsys):
    """``main.py --help`` lists LightningCLI's commands and ``inspect`` (LightningCLI's own list lacks it, and describes
    its commands by the Trainer's docstrings); a missing or misspelt command is one line naming them, exit status 2."""
    with pytest.raises(SystemExit) as done:
        entry_main(["--help"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if re.match(r"  \S", line)]
    assert done.value.code == 0 and listed == [*TCubeCLI.subcommands(), "inspect"]
    with pytest.raises(SystemExit) as done:
        entry_main(["--version"])
    installed = metadata.version("tcube-lightning")  # pyproject.toml's, as the package's metadata has it
    assert done.value.code == 0 and capsys.readouterr().out == f"tcube-lightning {installed}\n"
    for args, said in (([], "a command is required"), (["tset"], "unknown command 'tset' (did you mean test?)")):
        with pytest.raises(SystemExit) as done:
            entry_main(args)
        error = capsys.readouterr().err.splitlines()
        assert done.value.code == 2 and said in error[0] and "test, predict, inspect" in error[0]
        assert error[1] == "See `main.py --help` for the commands."


def test_help_and_print_config_list_the_options(capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        main(["test", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model.lambda_weights", "--model.gamma", "--data.splits", "--data.templates"):
        assert option in help_text
    for absent in ("--optimizer", "--lr_scheduler", "--ckpt_path"):  # nothing is trained or restored
        assert absent not in help_text
    methods_help = help_text[help_text.index("--model.methods METHODS") :]
    assert all(family in methods_help for family in METHOD_FAMILIES)  # the help lists every method
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as done:
        main(["test", "--config", "configs/demo.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert done.value.code == 0
    assert "lambda_weights: expert" in printed and "demo_in_domain.npz" in printed
    monkeypatch.chdir(REPO / "tests")  # another folder: the config's paths, the experts' included, stay its own
    with pytest.raises(SystemExit) as done:
        main(["test", "--config", "../configs/demo_experts.yaml", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["experts"]["shifted"] == str(REPO / "artifacts" / "demo" / "expert_shifted.pt")


@pytest.mark.parametrize("merge_text", [True, False])
def test_vectorized_and_loop_paths_agree_end_to_end(batch8_run, clip_pair, npz_root, tmp_path, merge_text):
    runs = {"vectorized": batch8_run[0]} if merge_text else {}  # batch8_run: samplewise auto, interpolated heads
    for path in ("loop", "vectorized")[: 2 - len(runs)]:
        extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", f"--model.samplewise={path}")
        extra += (f"--model.merge_text={str(merge_text).lower()}",)
        runs[path], _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / path, *extra))
    for split, file in SPLITS.items():
        assert runs["vectorized"]["accuracy"][split] == pytest.approx(runs["loop"]["accuracy"][split], abs=1e-9)
        if not merge_text:
            logits, labels = oracle_predictions(clip_pair, npz_root, file, [0.5], merge_text=False)
            expected = np.mean(logits[0.5].argmax(1) == labels)
            assert runs["loop"]["accuracy"][split]["wise_ft@0.5"] == pytest.approx(expected, abs=FRACTION_ATOL)


def test_forwards_are_shared_between_methods(clip_pair, npz_root, tmp_path, monkeypatch):
    """Two model forwards per batch serve every method; each merged method adds exactly one forward."""
    calls = []
    original = engine.clip_logits
    monkeypatch.setattr(engine, "clip_logits", lambda *args: calls.append(1) or original(*args))
    methods = "[zeroshot, expert, ensemble, select, wise_ft, task_arithmetic, t3_batch]"
    results, _ = run_cli_in_process(
        cli_args(clip_pair, npz_root, tmp_path, "--data.batch_size=8", f"--model.methods={methods}")
    )
    batches = 5 + 3  # 37 and 21 samples in batches of 8
    assert len(results["accuracy"]["a"]) == 7
    assert len(calls) == batches * (2 + 3)  # pt + ft, then wise_ft, task_arithmetic and t3_batch


def test_dawin_cluster_with_offset_uses_whole_split_statistics(clip_pair, npz_root, tmp_path):
    args = cli_args(
        clip_pair, npz_root, tmp_path, "--model.methods=[dawin_cluster]", "--model.baselines.dawin_offset=true"
    )
    results, _ = run_cli_in_process(args)
    assert "offset" in results["methods"]["dawin_cluster"]
    logits, _ = oracle_predictions(clip_pair, npz_root, SPLITS["a"], [0.0, 1.0])
    p_pt, p_ft = softmax(logits[0.0], -1), softmax(logits[1.0], -1)
    h_pt, h_ft = -(p_pt * np.log(p_pt)).sum(1), -(p_ft * np.log(p_ft)).sum(1)
    b = (h_pt.std(ddof=1) / h_pt.mean() + h_ft.std(ddof=1) / h_ft.mean()) / 2
    c = (h_pt.mean() + h_ft.mean()) / h_pt.mean()
    weights = (np.exp(-h_ft) + b / c) / (np.exp(-h_pt) + np.exp(-h_ft) + b)
    expected = fit_beta_mixture(torch.tensor(weights), components=3).means.tolist()
    assert results["clusters"]["a"]["dawin_cluster"]["means"] == pytest.approx(expected, abs=JS_ATOL)


def test_non_finite_logits_are_counted_and_keep_lambda_finite(batch8_run, clip_pair, npz_root, tmp_path, monkeypatch):
    original = engine.clip_logits

    def first_row_nan(*args):
        logits = original(*args).clone()
        logits[0] = float("nan")
        return logits

    monkeypatch.setattr(engine, "clip_logits", first_row_nan)
    extra = ("--data.batch_size=8", f"--model.gamma={GAMMA}", "--model.methods=[zeroshot, wise_ft, t3_batch]")
    with pytest.warns(UserWarning, match=r"non-finite logits .* for 8 sample"):
        results, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, *extra))
    assert results["nonfinite_samples"] == {"a": 5, "b": 3}  # row 0 of each batch
    clean = batch8_run[0]
    for split, n in (("a", 37), ("b", 21)):
        # NaN JS would make λ, and every merge a batch's mean λ takes part in, NaN.
        assert all(np.isfinite(v) for v in results["coefficients"][split].values())
        batches = results["nonfinite_samples"][split]
        assert abs(results["accuracy"][split]["wise_ft@0.5"] - clean["accuracy"][split]["wise_ft@0.5"]) <= batches / n


def test_a_run_resumes_from_its_default_folder_given_by_a_relative_path(
    clip_pair, npz_root, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    extra = ("--data.batch_size=8", "--model.methods=[zeroshot, t3, t3_batch, t3_cluster]")
    full, run_dir = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "runs", *extra))
    folder = str(run_dir.relative_to(tmp_path))  # runs/lightning_logs/version_0
    # Keep only split "a", as if the run had been interrupted after it (results are rewritten per split).
    partial = {k: ({"a": v["a"]} if isinstance(v, dict) and "a" in v else v) for k, v in full.items()}
    partial.update(complete=False, missing_splits=["b"])
    partial["accuracy"]["a"]["zeroshot"] = 0.123  # a marker: a skipped split is not recomputed
    (run_dir / "results.json").write_text(json.dumps(partial))
    resume = ("--model.resume=true", f"--model.results_dir={folder}", "--data.num_workers=0")
    main(cli_args(clip_pair, npz_root, tmp_path / "again", *extra, *resume))
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["accuracy"]["a"] == {**full["accuracy"]["a"], "zeroshot": 0.123}
    assert resumed["accuracy"]["b"] == full["accuracy"]["b"] and resumed["clusters"] == full["clusters"]
    assert resumed["complete"] is True and resumed["missing_splits"] == []
    tables = read_tables(run_dir / "analysis.npz")  # what the figures of every split are drawn from
    assert list(tables) == ["a", "b"] and len(tables["b"]["lambda"]) == 21
    # Resuming the finished run evaluates nothing and still reports: the table, every split's plots.
    capsys.readouterr()
    main(cli_args(clip_pair, npz_root, tmp_path / "third", *extra, *resume, "--model.plots=true"))
    printed = capsys.readouterr()
    assert any("nothing left to evaluate" in record.getMessage() for record in caplog.records)
    assert "Top-1 accuracy" in printed.out
    assert "│ zeroshot" in printed.out and "12.30" in printed.out  # the marker, from the file
    assert (run_dir / "plots" / "lambda_histograms.png").is_file() and (run_dir / "plots/a/js_vs_dawin.png").is_file()
    # Another configuration must not be mixed into these results.
    other = cli_args(clip_pair, npz_root, tmp_path / "other", *extra, *resume, "--model.gamma=3")
    assert "written with another configuration (differs in ['model.gamma'])" in run_cli_expecting_error(other, capsys)
    no_folder = cli_args(clip_pair, npz_root, tmp_path, "--model.resume=true")
    assert "model.resume needs model.results_dir" in run_cli_expecting_error(no_folder, capsys)


def test_results_file_grows_split_by_split(clip_pair, npz_root, tmp_path, monkeypatch):
    seen = []
    original = report.write_results
    monkeypatch.setattr(
        report, "write_results", lambda d, r, *note: seen.append(list(r["accuracy"])) or original(d, r, *note)
    )
    run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path, "--data.batch_size=8", "--model.methods=[zeroshot]"))
    assert seen == [["a"], ["a", "b"]]  # once per split


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Files for the bad-input cases: an empty split, float images, out-of-range labels, a corrupt checkpoint,
    and the checkpoint of a differently sized architecture."""
    import datasets

    root = tmp_path_factory.mktemp("bad")
    labels = np.array([[0.0], [1.5], [2.0], [1.0]])
    np.savez(root / "fractional.npz", test_images=np.zeros((4, 28, 28, 3), np.uint8), test_labels=labels)
    (root / "notes.txt").write_text("not a checkpoint at all\n")
    (root / "no_data").mkdir()
    (root / "malformed").mkdir()
    (root / "malformed" / "results.json").write_text("[1, 2]")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).save_to_disk(str(root / "hf_empty"))
    image = Image.fromarray(np.zeros((28, 28, 3), np.uint8))
    named = datasets.Dataset.from_dict({"image": [image] * 2, "label": [0, 1]}, features=features)
    named.save_to_disk(str(root / "hf_named"))
    unlabelled = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    (root / "hf_null_label").mkdir()
    missing = datasets.Dataset.from_dict({"image": [image] * 3, "label": [0, 1, None]}, features=unlabelled)
    missing.to_parquet(str(root / "hf_null_label" / "test.parquet"))
    np.savez(root / "empty.npz", test_images=np.zeros((0, 28, 28, 3), np.uint8), test_labels=np.zeros((0, 1), np.uint8))
    np.savez(
        root / "float.npz", test_images=np.zeros((4, 28, 28, 3), np.float32), test_labels=np.zeros((4, 1), np.uint8)
    )
    np.savez(
        root / "labels.npz", test_images=np.zeros((4, 28, 28, 3), np.uint8), test_labels=np.full((4, 1), 9, np.uint8)
    )
    (root / "corrupt.pt").write_bytes(b"\x80\x02 not a checkpoint")
    (root / "random.npz").write_bytes(bytes(range(256)) * 4)  # NumPy would call it "pickled (object) data"
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 28, "layers": 1, "width": 32, "head_width": 16, "patch_size": 4},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / "one_class" / "only").mkdir(parents=True)  # a labelled image folder of a single class
    image.save(root / "one_class" / "only" / "0.png")
    nan_image = np.zeros((28, 28), np.float32)
    nan_image[5, 5] = np.nan  # one NaN pixel in a float-array image
    arrays = datasets.Features(
        {"image": datasets.Array2D((28, 28), "float32"), "label": datasets.ClassLabel(names=CLASSNAMES)}
    )
    datasets.Dataset.from_dict(
        {"image": [np.ones((28, 28), np.float32), nan_image], "label": [0, 1]}, features=arrays
    ).save_to_disk(str(root / "hf_nan"))
    (root / "other-arch.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "other-arch.json")
    torch.save(open_clip.create_model("other-arch").state_dict(), root / "other.pt")
    return root


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--model.lambda_max=0.5", "--model.lambda_min=0.9"], "model.lambda_min (0.9) must not exceed model.lam"),
        (["--model.methods=[t3, magic]"], "unknown method(s) ['magic']"),
        (['--data.sources={{"a": "missing.npz"}}'], "data file not found"),
        (["--data.image_size=224"], "data.image_size is 224 but tcube-tiny-clip expects 28-pixel images"),
        (["--model.gamma=-1"], "model.gamma must be >= 0"),
        (["--model.expert_checkpoint={bad}/corrupt.pt"], "corrupt.pt could not be read as a checkpoint"),
        (["--model.expert_checkpoint={bad}/other.pt"], "other.pt does not hold the architecture's weights under any"),
        (["--model.arch=ViT-Q-99"], "open_clip has no model config named 'ViT-Q-99'"),
        (['--data.sources={{"e": "{bad}/empty.npz"}}'], "split 'test' is empty"),
        (['--data.sources={{"f": "{bad}/float.npz"}}'], "test_images must be uint8"),
        (['--data.sources={{"l": "{bad}/labels.npz"}}'], "4 label(s) outside 0..3 for 4 class names"),
        (["--data.modality=skin"], "unknown modality 'skin'"),
        (["--data.modality=breast", "--data.corruptions=[snow]"], "data.corruptions: unknown for breast: ['snow']"),
        (["--data.modality=breast", "--data.severities=[6]"], "[6] outside 1..5"),
        (["--model.baselines.dare_drop=1.0"], "dare_drop 1.0 not in [0, 1)"),
        (["--model.clusters=0"], "model.clusters must be >= 1"),
        (['--data.sources={{"f": "{bad}/fractional.npz"}}'], "1 label(s) are not whole class indices (first: 1.5)"),
        (['--data.sources={{"h": "{bad}/hf_empty"}}'], "hf_empty: split 'test' is empty"),
        (['--data.sources={{"h": "{bad}/no_data"}}'], "no_data: no image files (.png, .jpg"),
        (["--model.expert_checkpoint={bad}/notes.txt"], "notes.txt is not a checkpoint file"),
        (
            ['--data.sources={{"h": "{bad}/hf_named"}}'],
            "data.classnames ['circle', 'square', 'triangle', 'cross'] disagree with the class names",
        ),
        (
            ["--data.root={bad}", "--data.modality=breast", "--data.splits=[in_domain, base_to_novel]"],
            "4 problems with the data: (1) data file not found: {bad}/breastmnist_224.npz",
        ),
        (
            ["--model.resume=true", "--model.results_dir={bad}/malformed"],
            "model.resume: {bad}/malformed/results.json holds a list, not a tcube-lightning results object",
        ),
        (["--model.grid=[{{gamma: 4}}, {{gamma: -1}}]"], "model.grid[1] (gamma=-1): model.gamma must be >= 0"),
        (["--model.grid=[{{}}]"], "model.grid[0] sets none of ['gamma', 'lambda_min', 'lambda_max', 'lambda_weights']"),
        (["--model.grid=[{{gamma: 4}}, {{gamma: 4.0}}]"], "model.grid[1] repeats the setting 'gamma=4'"),
        (["--model.grid=[{{lambda_weights: expert}}]"], "model.grid[0] (lambda_weights=expert) is the run's own"),
        (["--model.grid=[{{gama: 4}}]"], "model.grid[0]: unknown field(s) ['gama'] (did you mean gamma?)"),
        (
            ["--data.classnames=[circle, Circle, square, ' circle ']"],
            "class names must be distinct as the prompts read them (case and spacing ignored); repeated: ['circle', "
            "'Circle', ' circle ']",
        ),
        (['--data.sources={{"r": "{bad}/random.npz"}}'], "random.npz: not an npz file (a zip archive of .npy arrays"),
        (
            ["--model.lambda_weights=foo"],
            "Parser key \"model.lambda_weights\": Expected a typing.Literal['pretrained', 'expert']. Got value: foo",
        ),
        (["--model.results_dir=/proc/tcube_x"], "model.results_dir: /proc/tcube_x cannot be made in /proc"),
        (['--data.templates=["a {{}} of a {{}}"]'], "data.templates: 'a {{}} of a {{}}' has 2 replacement field(s)"),
        (
            ['--data.sources={{"h": "{bad}/hf_null_label"}}'],
            "split 'h': 1 label(s) are missing (null or NaN; first at row 2)",
        ),
        (["--model.experts={{a: x.pt, b: y.pt, a: z.pt}}"], "'a' is named twice in one mapping"),
        (['--data.mixes={{"m": ["a"]}}'], "data.mixes.m: mixes one split only ('a')"),
        (["--data.classnames=[circle, '', triangle, cross]"], "class name(s) at position [1] are empty"),
        (["--data.templates=[]"], "data.templates: an empty list"),
        (["--model.methods=[]"], "model.methods: an empty list"),
        (["--model.methods=[t3, t3_bach]"], "unknown method(s) ['t3_bach'] (did you mean t3_batch?)"),
        (["--trainer.precision=64-true"], "trainer.precision: 64-true is not supported"),
        (["--trainer.precision=16-true", "--trainer.accelerator=cpu"], "trainer.precision: 16-true on the CPU"),
        (
            ['--data.sources={{"o": "{bad}/one_class"}}', "--data.classnames=null"],
            "split 'o': 1 class (['only']); zero-shot classification",
        ),
        (["--data.expert_of={{a: expert}}"], "data.expert_of names each split's domain expert among several"),
        (['--data.sources={{"h": "{bad}/hf_nan"}}'], "hf_nan, row 1: 1 of the image's 784 values are NaN or infinite"),
        (["--trainer.limit_test_batches=0"], "trainer.limit_test_batches: 0 reads no batch"),
        (["--data.num_workers=-1"], "data.num_workers must be >= 0 (0: read in the main process), got -1"),
        (  # one GPU more than this machine has (CI's: none)
            ["--trainer.accelerator=cuda", f"--trainer.devices={torch.cuda.device_count() + 1}"],
            f"(check --trainer.accelerator and --trainer.devices: torch sees {torch.cuda.device_count()} GPU",
        ),
    ],
    ids=[
        "lambda-range",
        "unknown-method",
        "missing-data",
        "image-size",
        "gamma",
        "corrupt-checkpoint",
        "architecture-mismatch",
        "unknown-arch",
        "empty-split",
        "image-dtype",
        "labels-range",
        "unknown-modality",
        "unknown-corruption",
        "severity",
        "dare-drop",
        "clusters",
        "fractional-labels",
        "empty-hf-dataset",
        "empty-hf-folder",
        "not-a-checkpoint",
        "classnames-disagree",
        "every-missing-file",
        "malformed-results",
        "grid-gamma",
        "grid-empty",
        "grid-repeat",
        "grid-own",
        "grid-unknown-field",
        "repeated-classnames",
        "random-bytes-npz",
        "lambda-weights",
        "results-dir-unmakeable",
        "template-placeholders",
        "hf-null-label",
        "expert-named-twice",
        "one-member-mix",
        "empty-classname",
        "empty-templates",
        "empty-methods",
        "method-did-you-mean",
        "double-precision",
        "half-precision-on-cpu",
        "single-class",
        "expert-of-with-one-expert",
        "nan-pixel",
        "no-batch",
        "negative-workers",
        "more-gpus-than-here",
    ],
)
def test_bad_input_through_the_cli(clip_pair, npz_root, tmp_path, bad, capsys, overrides, message):
    extra = [o.format(bad=bad) for o in overrides]
    args = cli_args(clip_pair, npz_root, tmp_path, f"--model.model_config={bad / 'other-arch.json'}", *extra)
    said = run_cli_expecting_error(args, capsys)
    assert message.format(bad=bad) in said.splitlines()[0]  # one line with its cause
    assert len(said.splitlines()) == 1 or said.splitlines()[1].startswith("See `")  # then, at most, where the help is
    assert len(said) < 1000  # a summary, not every key of a model
    assert not list(tmp_path.rglob("results.json"))
    assert not list(tmp_path.rglob("version_*"))  # no empty run folder left behind


def test_same_config_and_seed_give_identical_results_files(clip_pair, npz_root, tmp_path):
    # The sample-wise path named: auto chooses by timing, and the two paths agree only to float rounding.
    extra = ("--data.batch_size=8", "--model.methods=[zeroshot, dare, m3, t3, t3_cluster]", "--model.samplewise=loop")
    texts = []
    for run in ("first", "second"):
        _, run_dir = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / run, *extra))
        texts.append((run_dir / "results.json").read_text())
    assert texts[0] == texts[1]


def test_existing_results_are_not_replaced_unless_asked(clip_pair, npz_root, tmp_path, capsys):
    out = tmp_path / "results"
    extra = ("--data.batch_size=8", "--model.methods=[zeroshot]", f"--model.results_dir={out}")
    main(cli_args(clip_pair, npz_root, tmp_path / "first", *extra, '--data.sources={"a": "tiny_a.npz"}'))
    first = (out / "results.json").read_text()
    again = cli_args(clip_pair, npz_root, tmp_path / "second", *extra)
    assert "already holds results.json from an earlier run" in run_cli_expecting_error(again, capsys)
    assert (out / "results.json").read_text() == first
    both = [*again, "--model.resume=true", "--model.overwrite=true"]
    assert "model.resume and model.overwrite exclude each other" in run_cli_expecting_error(both, capsys)
    main([*again, "--model.overwrite=true"])
    assert list(json.loads((out / "results.json").read_text())["accuracy"]) == ["a", "b"]


def test_settings_refused_before_any_model_loads(clip_pair, npz_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tcube_lightning.loading.sources.load_source", lambda *a: pytest.fail("a model was loaded"))
    (tmp_path / "a_file").write_text("")
    args = cli_args(clip_pair, npz_root, tmp_path / "runs", f"--model.results_dir={tmp_path / 'a_file' / 'results'}")
    assert "a_file exists and is not a folder" in run_cli_expecting_error(args, capsys)
    # A reference method that is not evaluated: said at once; an error where corrupted splits need it.
    write_medmnist_npz(tmp_path / "breastmnist.npz", 4, 2)
    corrupted = [
        "test",
        f"--model.arch={ARCH}",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        "--model.methods=[zeroshot, t3]",
        "--model.mce_reference=ensemble",
        f"--data.root={tmp_path}",
        "--data.modality=breast",
        "--data.splits=[in_domain, corrupted]",
        "--data.size=28",
        "--data.image_size=28",
        "--data.corruption_source=on_the_fly",
        "--data.corruptions=[pixelate]",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
    ]
    # a Trainer setting it refuses: one line, without the hint about GPUs meant for the accelerator and devices
    said = run_cli_expecting_error([*args[:-1], "--trainer.limit_test_batches=-1"], capsys).splitlines()[0]
    assert said.endswith("invalid value -1 for limit_test_batches, it has to be in [0.0, 1.0] or an int."), said
    message = run_cli_expecting_error(corrupted, capsys)  # refused before any model loads, not only warned about
    assert "model.mce_reference: 'ensemble' is not among the evaluated methods" in message
    assert "unrecognized arguments: --model.gamm" in run_cli_expecting_error(
        cli_args(clip_pair, npz_root, tmp_path / "runs", "--model.gamm=2"), capsys
    )


def test_lambda_weights_the_expert_by_default_as_t3s_figure_and_code_do():
    import inspect

    from tcube_lightning.evaluation.module import TCubeModule

    assert inspect.signature(TCubeModule).parameters["lambda_weights"].default == "expert"
    page = (REPO / "docs" / "index.md").read_text()  # the documentation's statement of both readings
    for quote in (
        "Higher disagreement (larger JS divergence) increases the expert model's influence",  # Figure 4
        "`(1-alpha)*w_zs +\n  alpha*w_ft`",  # DaWin's code, which T³'s code reuses
        "defers to generalist robustness under drift",  # the abstract: lambda_weights: pretrained
    ):
        assert quote in page, quote
    for config in ("configs/demo.yaml", "configs/base/model.yaml"):
        assert "lambda_weights: expert" in (REPO / config).read_text()


def test_a_key_named_twice_in_a_config_file_is_refused_naming_the_file(tmp_path, capsys):
    config = tmp_path / "experts.yaml"
    config.write_text("model:\n  experts:\n    noisy: a.pt\n    shifted: b.pt\n    noisy: c.pt\n")
    message = run_cli_expecting_error(["test", "--config", str(config)], capsys)
    assert f"'noisy' is named twice in one mapping (line 5, column 5 of {config})" in message


def test_resume_into_a_folder_without_results_starts_from_the_first_split_and_says_so(
    clip_pair, npz_root, tmp_path, caplog
):
    out = tmp_path / "requeued"  # a preemptible job's command, run for the first time
    extra = ("--model.methods=[zeroshot]", f"--model.results_dir={out}", "--model.resume=true")
    main(cli_args(clip_pair, npz_root, tmp_path, *extra, '--data.sources={"a": "tiny_a.npz"}'))
    assert f"model.resume: {out} holds no results.json yet; the run starts from its first split" in caplog.text
    assert list(json.loads((out / "results.json").read_text())["accuracy"]) == ["a"]
