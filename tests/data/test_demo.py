"""The embedded demo: its builder, and configs/demo.yaml run through the real command line."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import REPO, cli_arguments, shell_blocks
from tcube_lightning.cli.app import main
from tcube_lightning.data import demo
from tcube_lightning.merging.methods import build_methods, with_grid


@pytest.mark.parametrize("name", ["demo.yaml", "demo_experts.yaml"])
def test_demo_config_matches_the_builder(name):
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    assert config["data"]["classnames"] == list(demo.EXPERT_CLASSES)
    assert config["model"]["arch"] == demo.ARCH
    assert config["data"]["image_size"] == demo.IMAGE_SIZE


def test_demo_builds_deterministically_and_runs_through_the_cli(tmp_path, capsys, caplog, monkeypatch):
    first, second = tmp_path / "demo1", tmp_path / "demo2"
    for out in (first, second):
        demo.main(["--out", str(out), "--generalist-steps", "1", "--expert-steps", "3", "--per-class", "5"])
    # the build says how far it got; any step count works (fewer than 10 once divided by 0)
    progress = capsys.readouterr().out
    assert "demo: training the generalist, step 1/1" in progress and "training the expert, step 3/3" in progress
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]  # trained next
    assert demo.demo_is_built(first)
    assert "training the second expert, step 3/3" in progress
    for name in ("generalist.pt", "expert.pt", "expert_shifted.pt"):
        a, b = torch.load(first / name, weights_only=True), torch.load(second / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("demo_in_domain.npz", "demo_shifted.npz"):
        a, b = np.load(first / name), np.load(second / name)
        assert a["test_images"].shape == (30, 28, 28, 3) and a["test_images"].dtype == np.uint8
        np.testing.assert_array_equal(a["test_images"], b["test_images"])
        np.testing.assert_array_equal(a["test_labels"][:, 0], np.repeat(np.arange(6), 5))
    monkeypatch.chdir(tmp_path)  # the config's paths are relative to its own folder: any folder runs it
    capsys.readouterr()
    main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"--model.pretrained_checkpoint={first / 'generalist.pt'}",
            f"--model.expert_checkpoint={first / 'expert.pt'}",
            f"--data.root={first}",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--model.plots=false",  # drawn and checked in test_protocol.py
            "--model.adamerging.steps=2",  # the config's 500 steps per split: checked in test_adamerging.py
        ]
    )
    printed = capsys.readouterr().out
    (results_file,) = (tmp_path / "runs").rglob("results.json")
    results = json.loads(results_file.read_text())
    assert results["num_samples"] == {"in_domain": 21, "shifted": 30, "mixed": 51}  # 9 in-domain samples calibrate
    assert results["calibration"]["samples"] == 9 and set(results["guarantee"]["shifted"]) == set(results["methods"])
    families = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["model"]["methods"]
    every = with_grid(build_methods(arch=demo.ARCH), ["gamma=8"])
    assert list(results["accuracy"]["shifted"]) == [n for n, m in every.items() if m.family in families]
    # the final table (rich): one row per method with both splits' top-1 in percent
    t3_row = re.search(r"│ t3 +│ +(\d+\.\d\d) │ +(\d+\.\d\d) │ +(\d+\.\d\d) │", printed)  # then AURC, …
    expected = [f"{100 * results['accuracy'][split]['t3']:.2f}" for split in ("in_domain", "shifted", "mixed")]
    assert t3_row is not None and list(t3_row.groups()) == expected, printed[-2000:]
    assert "│ t3[gamma=8] " in printed  # the config's grid column, named as in results.json
    assert not [r for r in caplog.records if "our extension" in r.getMessage()]  # one expert: the paper's T³

    # configs/demo_experts.yaml: both experts, the K = 2 rows (T³ with several experts, our extension)
    main(
        [
            "test",
            "--config",
            str(REPO / "configs" / "demo_experts.yaml"),
            f"--model.pretrained_checkpoint={first / 'generalist.pt'}",
            f"--model.experts={{noisy: {first / 'expert.pt'}, shifted: {first / 'expert_shifted.pt'}}}",
            f"--data.root={first}",
            f"--trainer.default_root_dir={tmp_path / 'runs_k'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs_k'}",
            "--model.plots=false",
            "--model.adamerging.steps=2",
        ]
    )
    printed = capsys.readouterr().out
    (results_file,) = (tmp_path / "runs_k").rglob("results.json")
    results = json.loads(results_file.read_text())
    assert list(results["models"]["experts"]) == ["noisy", "shifted"]
    assert {"expert:noisy", "expert:shifted", "t3", "t3_batch", "dawin_mtl"} <= set(results["accuracy"]["mixed"])
    assert "│ expert:shifted " in printed and "normalised mean (2 splits)" in printed
    # the table's T³ columns (and their grid's) are said to be our extension, under it and in the files
    ours = [m for m in results["accuracy"]["mixed"] if m.partition("[")[0] in ("t3", "t3_batch")]
    note = (
        f"{', '.join(ours)}: T³ with several experts, our extension of the paper (which merges one generalist with "
        "one expert); see docs/experts.md."
    )
    assert ours == ["t3", "t3[gamma=8]", "t3_batch", "t3_batch[gamma=8]"]
    assert note in [r.getMessage() for r in caplog.records]
    for name in ("results.md", "summary.md"):
        assert note in (results_file.parent / name).read_text().splitlines(), name

    # docs/predict.md's command, as the page writes it, on a folder of images with the demo config as it is
    (command,) = [c for marked, cs in shell_blocks(REPO / "docs" / "predict.md") for c in cs if "predict --config" in c]
    scans = tmp_path / "clinic" / "scans"
    scans.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((28, 28, 3), 70 * i, np.uint8)).save(scans / f"{i}.png")
    arguments = [str(REPO / a) if a.startswith("configs/") else a for a in cli_arguments(command)]
    tiny = [
        f"--model.pretrained_checkpoint={first / 'generalist.pt'}",
        f"--model.expert_checkpoint={first / 'expert.pt'}",
    ]
    caplog.clear()
    main([*arguments, *tiny, "--model.adamerging.steps=2"])
    said = [record.getMessage() for record in caplog.records]
    assert "predict leaves aside data.mixes: settings of test (labelled splits)" in said
    predictions = json.loads((tmp_path / "my_predictions" / "predictions" / "predictions.json").read_text())
    assert predictions["complete"] and predictions["sources"]["scans"]["rows"] == 3
