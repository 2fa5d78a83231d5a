"""Honest runs through the real command line: partial evaluations say so everywhere, one folder per run, paths in
a config file read from its folder, image folders name their classes, short errors, Ctrl+C said like SIGTERM."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import (
    CLASSNAMES,
    SPLITS,
    TEMPLATES,
    cli_args,
    interrupt_in_split,
    run_cli_expecting_error,
    run_cli_in_process,
)
from tcube_lightning.cli.app import main
from tcube_lightning.engine import torch_engine as engine_module


def test_a_partial_evaluation_says_so_everywhere_and_resume_completes_it(clip_pair, npz_root, tmp_path, caplog):
    out = tmp_path / "results"
    extra = ("--data.batch_size=8", "--model.methods=[zeroshot, t3_cluster]", f"--model.results_dir={out}")
    with pytest.warns(UserWarning, match=r"partial results: .*a 16 of 37, b 16 of 21"):
        limited = cli_args(clip_pair, npz_root, tmp_path, *extra, "--trainer.limit_test_batches=2")
        results, _ = run_cli_in_process(limited)
    assert results["complete"] is False and results["missing_splits"] == []
    assert results["partial_splits"] == {"a": {"evaluated": 16, "total": 37}, "b": {"evaluated": 16, "total": 21}}
    assert results["num_samples"] == {"a": 16, "b": 16}  # the clustered methods' second pass too
    assert "## Partial results" in (out / "results.md").read_text()
    header = "method,a (partial 16/37),b (partial 16/21),AURC,AURC (JS)"
    assert (out / "summary.csv").read_text().splitlines()[0] == header
    again, _ = run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "again", *extra, "--model.resume=true"))
    assert again["complete"] is True and again["partial_splits"] == {} and again["num_samples"] == {"a": 37, "b": 21}
    one, _ = run_cli_in_process(
        cli_args(
            clip_pair,
            npz_root,
            tmp_path / "dev",
            "--model.methods=[zeroshot]",
            "--trainer.fast_dev_run=true",
            "--data.batch_size=4",
        )
    )
    assert one["partial_splits"] == {"a": {"evaluated": 4, "total": 37}, "b": {"evaluated": 4, "total": 21}}


def test_one_folder_per_run_and_overwrite_leaves_nothing_of_the_replaced_run(clip_pair, npz_root, tmp_path):
    out = tmp_path / "results"
    first = ("--model.methods=[zeroshot, t3]", f"--model.results_dir={out}", "--model.plots=true")
    run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "runs", *first, "--model.export_samples=true"))
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "hparams.yaml", "results.json", "plots", "samples"} <= names
    assert len(list(out.glob("events.out.tfevents.*"))) == 1 and not (tmp_path / "runs").exists()
    replace = ("--model.methods=[zeroshot]", f"--model.results_dir={out}", "--model.overwrite=true")
    run_cli_in_process(cli_args(clip_pair, npz_root, tmp_path / "runs", *replace))
    assert not (out / "plots").exists() and not (out / "samples").exists()
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["methods"] == ["zeroshot"]


def test_a_run_that_finishes_no_split_leaves_no_folder(clip_pair, npz_root, tmp_path, monkeypatch):
    def failing(self, *args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(engine_module.TCubeEngine, "coefficients", failing)  # after the models have loaded
    for extra in ((), (f"--model.results_dir={tmp_path / 'results'}",)):
        with pytest.raises(RuntimeError, match=r"out of memory"):
            main(cli_args(clip_pair, npz_root, tmp_path / "runs", "--model.methods=[zeroshot]", *extra))
    assert not list((tmp_path / "runs").rglob("version_*")) and not (tmp_path / "results").exists()


def test_paths_in_a_config_file_are_read_from_its_folder_and_a_run_resumes_from_anywhere(
    clip_pair, npz_root, tmp_path, monkeypatch, caplog
):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copytree(npz_root, project / "data")
    shutil.copytree(clip_pair[0].parent, project / "models")
    config = {
        "model": {
            "arch": "tcube-tiny-clip",
            "pretrained_checkpoint": "../models/pretrained.pt",
            "expert_checkpoint": "../models/expert.pt",
            "methods": ["zeroshot", "t3"],
            "plots": False,
        },
        "data": {
            "root": "../data",
            "sources": SPLITS,
            "classnames": CLASSNAMES,
            "templates": TEMPLATES,
            "image_size": 28,
        },
        "trainer": {"default_root_dir": "../runs", "enable_progress_bar": False},
    }
    (project / "configs" / "run.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["test", "--config", str(project / "configs" / "run.yaml")])
    (run_dir,) = [p.parent for p in (project / "runs").rglob("results.json")]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["root"] == str(project / "data") and saved["model"]["expert_checkpoint"].startswith("/")
    monkeypatch.chdir(tmp_path)  # resume from a third folder, with the config the run saved
    main(["test", "--config", str(run_dir / "config.yaml"), f"--model.results_dir={run_dir}", "--model.resume=true"])
    assert any("nothing left to evaluate" in record.getMessage() for record in caplog.records)


def test_an_image_folder_names_its_classes(clip_pair, tmp_path, capsys):
    folder = tmp_path / "scans"
    for i, name in enumerate(["circle", "cross", "square"]):
        (folder / name).mkdir(parents=True)
        Image.fromarray(np.full((28, 28, 3), 60 * i, np.uint8)).save(folder / name / f"{i}.png")
    args = [
        a
        for a in cli_args(
            clip_pair,
            tmp_path,
            tmp_path / "runs",
            "--model.methods=[zeroshot, t3]",
            "--model.lambda_min=0.3",
            "--model.lambda_max=0.3",
        )
        if not a.startswith(("--data.sources", "--data.classnames"))
    ]
    with pytest.warns(UserWarning, match=r"lambda_min = lambda_max = 0.3000: T³ is a fixed interpolation") as warned:
        results, _ = run_cli_in_process([*args, '--data.sources={"scans": "scans"}'])
    assert results["classnames"] == {"scans": ["circle", "cross", "square"]}
    assert not [w for w in warned if "larger gamma" in str(w.message)]  # no γ can widen a range of one point
    assert "Downloading" not in capsys.readouterr().err  # local files read offline: no download bar


def test_errors_are_one_line_with_a_suggestion_and_help_is_about_evaluating(clip_pair, npz_root, tmp_path, capsys):
    typo = run_cli_expecting_error(cli_args(clip_pair, npz_root, tmp_path, "--model.gama=2"), capsys)
    assert "did you mean --model.gamma?" in typo and len(typo.strip().splitlines()) == 2 and "--help" in typo
    (tmp_path / "typo.yaml").write_text("model:\n  gama: 2\n")
    in_file = run_cli_expecting_error(
        [*cli_args(clip_pair, npz_root, tmp_path), f"--config={tmp_path / 'typo.yaml'}"], capsys
    )
    assert "--model.gamma" in in_file and len(in_file.strip().splitlines()) == 2
    missing = run_cli_expecting_error(["test", "--config", str(tmp_path / "nowhere.yaml")], capsys)
    assert "nowhere.yaml" in missing and len(missing.strip().splitlines()) == 2
    no_data = run_cli_expecting_error(["test"], capsys).strip().splitlines()  # said as the option, with test's help
    assert no_data[0].endswith("required: --data.root") and no_data[1].endswith(" test --help` for the options.")
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    help_text = capsys.readouterr().out
    assert "--trainer.limit_test_batches" in help_text and "--model.expert_checkpoint" in help_text
    for training_only in ("--trainer.max_epochs", "--trainer.gradient_clip_val", "--trainer.accumulate_grad_batches"):
        assert training_only not in help_text


def test_ctrl_c_stops_the_run_like_sigterm_saying_how_to_resume(clip_pair, npz_root, tmp_path, capsys, monkeypatch):
    interrupt_in_split(monkeypatch, "b")
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as stop:
        main(cli_args(clip_pair, npz_root, tmp_path, "--model.methods=[zeroshot]", f"--model.results_dir={out}"))
    assert stop.value.code == 130
    said = capsys.readouterr().err
    assert f"stopped by SIGINT before the last split; {out}/results.json holds the splits finished so far" in said
    assert f"run again with --model.resume true --model.results_dir {out} to complete it" in said
    assert json.loads((out / "results.json").read_text())["missing_splits"] == ["b"]
    assert "## Missing splits\n\nThe run stopped before these splits" in (out / "results.md").read_text()
    assert "Missing splits (not evaluated yet, left out of every mean): b" in (out / "summary.md").read_text()


def test_a_stopped_run_is_said_once_from_rank_zero_and_every_process_exits_with_the_signal(capsys, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from tcube_lightning.cli.app import stopped_by

    module = SimpleNamespace(hparams=SimpleNamespace(results_dir="runs/x"))  # stopped before its first split
    for rank, says in ((0, True), (1, False)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(SystemExit) as stop:
            stopped_by("SIGTERM", signal.SIGTERM, "test", module)
        said = capsys.readouterr().err
        assert stop.value.code == 143 and ("stopped by SIGTERM before its first split" in said) == says


def test_sigterm_during_adamergings_adaptation_stops_within_a_step(clip_pair, npz_root, tmp_path, capsys, monkeypatch):
    """A real SIGTERM, to this process, while the first split adapts (hundreds of steps inside one batch): the run
    stops at the next step and says that nothing was written."""
    from tcube_lightning.evaluation import adaptation

    drawn = []

    def signalling(*args):
        for step, images in enumerate(original(*args)):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it
            drawn.append(step)
            yield images

    original = adaptation.batches
    monkeypatch.setattr(adaptation, "batches", signalling)
    out = tmp_path / "results"
    args = ["--model.methods=[adamerging_task]", "--model.adamerging.steps=500", f"--model.results_dir={out}"]
    with pytest.raises(SystemExit) as stop:
        main(cli_args(clip_pair, npz_root, tmp_path, *args))
    assert stop.value.code == 143 and len(drawn) == 4  # the check before step 4 stopped it
    assert "stopped by SIGTERM before its first split: nothing was written; run it again" in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_a_run_whose_numbers_would_differ_naming_the_trainer_setting(
    clip_pair, npz_root, tmp_path, capsys, monkeypatch
):
    interrupt_in_split(monkeypatch, "b")
    out = tmp_path / "results"
    args = cli_args(clip_pair, npz_root, tmp_path, "--model.methods=[zeroshot]", f"--model.results_dir={out}")
    with pytest.raises(SystemExit):
        main([*args, "--trainer.precision=bf16-mixed"])
    assert json.loads((out / "results.json").read_text())["config"]["trainer"]["precision"] == "bf16-mixed"
    monkeypatch.undo()
    said = run_cli_expecting_error([*args, "--trainer.precision=32-true", "--model.resume=true"], capsys)
    assert "was written with another configuration (differs in ['trainer.precision'])" in said
