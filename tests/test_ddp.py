"""Two CPU processes (gloo) give the same results files as one, byte for byte, and the same per-sample tables
(analysis and export) in the one-process order: no sample counted twice, none dropped, the same batches (so
batch-wise T³ is unchanged), a process with no batch of a split included, and on-the-fly corruptions seeded per
sample.

The two-process runs go through the command line in a subprocess (DDP inside pytest re-launches pytest itself), the
test run and the predict run in one launch of the two processes (``ddp_runs.py``).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import LOGITS_ATOL, REPO, run_cli_in_process, subprocess_env, write_medmnist_npz
from tcube_lightning.cli.app import main
from tcube_lightning.merging.methods import K_EXPERT_DEFAULTS, METHOD_FAMILIES
from tcube_lightning.reporting.samples import read_table, read_tables

RESULTS_FILES = ("results.json", "results.md", "summary.csv", "summary.json", "summary.md")


@pytest.fixture(scope="module")
def arguments(clip_pair, tmp_path_factory):
    """Batches of 3 with every method: the two on-the-fly corrupted splits (8 samples) are 3 batches each (process
    0 reads two, process 1 one); 2 of in_domain's 8 samples are the calibration split, one batch which process 1 never
    reads, and its other 6 two batches; the split "few" (3 samples) is one batch, which process 1 never reads; the mix
    "stream" of all four."""
    root = tmp_path_factory.mktemp("ddp_data")
    write_medmnist_npz(root / "breastmnist.npz", 8, 2)
    write_medmnist_npz(root / "few.npz", 3, 2, seed=5)
    return [
        "test",
        "--model.arch=tcube-tiny-clip",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        "--model.gamma=20",
        "--model.samplewise=vectorized",
        f"--data.root={root}",
        "--data.modality=breast",
        "--data.splits=[in_domain, corrupted]",
        "--data.size=28",
        "--data.image_size=28",
        "--data.corruption_source=on_the_fly",
        "--data.batch_size=3",
        "--data.corruptions=[speckle_noise, pixelate]",
        "--data.severities=[5]",
        '--data.sources={"few": "few.npz"}',
        '--data.mixes={"stream": ["in_domain", "*@*", "few"]}',  # 25 samples, batches mixing the four
        "--data.calibration=in_domain:0.3",  # 2 of in_domain's 8 samples: every process calibrates on the same rules
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--model.plots=false",
        "--seed_everything=0",
        "--model.grid=[{gamma: 4}]",
        "--model.export_samples=true",
        f"--model.methods=[{', '.join(METHOD_FAMILIES)}]",
        "--model.adamerging.steps=2",
        "--model.adamerging.batch_size=4",  # every process learns AdaMerging's coefficients from the same images
    ]


@pytest.fixture(scope="module")
def single(arguments, tmp_path_factory):
    """The one-process reference, in-process (nothing about it needs a fresh process), with the one torch thread
    each of the two processes gets (Lightning gives each cores // processes): the same arithmetic, so that even
    probabilities (calibration metrics) agree to the bit, not only predictions."""
    out, threads = tmp_path_factory.mktemp("one"), torch.get_num_threads()
    per_process = os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2)  # Lightning's rule
    torch.set_num_threads(int(per_process))
    try:
        return run_cli_in_process([*arguments, "--trainer.devices=1", f"--trainer.default_root_dir={out}"])[1]
    finally:
        torch.set_num_threads(threads)


def k_arguments(arguments, expert_team):
    """The test run with two experts, a full one and a LoRA one (T³ with several experts, our extension), and every
    method defined for several."""
    experts = json.dumps({"full": str(expert_team["full_a"][0]), "lora": str(expert_team["lora_a"][0])})
    replaced = {"--model.expert_checkpoint": f"--model.experts={experts}", "--model.methods": K_METHODS}
    return [replaced.get(a.split("=", 1)[0], a) for a in arguments]


K_METHODS = f"--model.methods=[{', '.join(K_EXPERT_DEFAULTS)}, adamerging_task, adamerging_layer]"


@pytest.fixture(scope="module")
def single_k(arguments, expert_team, tmp_path_factory):
    """The two-expert run on one process, threads as ``single``."""
    out, threads = tmp_path_factory.mktemp("one_k"), torch.get_num_threads()
    per_process = os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2)
    torch.set_num_threads(int(per_process))
    try:
        args = [*k_arguments(arguments, expert_team), "--trainer.devices=1", f"--trainer.default_root_dir={out}"]
        return run_cli_in_process(args)[1]
    finally:
        torch.set_num_threads(threads)


def assert_tables_equal(tables, expected):
    assert sorted(tables) == sorted(expected)
    for split, table in expected.items():
        assert list(tables[split]) == list(table) and len(table["index"]) > 0
        for column, values in table.items():
            np.testing.assert_array_equal(tables[split][column], values, err_msg=f"{split}: {column}")


def predict_arguments(arguments, clip_pair):
    """predict on the test run's data: two sources, one ("few") a single batch that the second process never reads."""
    root = next(a for a in arguments if a.startswith("--data.root="))
    return [
        "predict",
        "--model.arch=tcube-tiny-clip",
        f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}",
        "--model.gamma=20",
        "--model.methods=[t3, t3_batch, t3_cluster]",
        root,
        '--data.sources={"in": "breastmnist.npz", "few": "few.npz"}',
        "--data.flag=breastmnist",
        "--data.size=28",
        "--data.image_size=28",
        "--data.batch_size=3",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="module")
def two_processes(arguments, clip_pair, expert_team, tmp_path_factory):
    """The test run, the predict run and the two-expert run on 2 processes (ddp), one launch: (the subprocess, test's,
    predict's and the two-expert run's output folders)."""
    out = tmp_path_factory.mktemp("two")
    distributed = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    predict = [*predict_arguments(arguments, clip_pair), *distributed, f"--model.results_dir={out / 'predict'}"]
    k_run = [*k_arguments(arguments, expert_team), *distributed, f"--trainer.default_root_dir={out / 'k'}"]
    runs = [[*arguments, *distributed, f"--trainer.default_root_dir={out / 'test'}"], predict, k_run]
    env = subprocess_env(PYTHONPATH=str(REPO))
    script = [sys.executable, str(REPO / "tests" / "ddp_runs.py"), json.dumps(runs)]
    result = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[result.stderr.find("Traceback") :][:6000]
    return result, out / "test", out / "predict", out / "k"


def test_two_processes_write_the_same_results_as_one(two_processes, single):
    result, tmp_path, *_ = two_processes
    files = list(tmp_path.rglob("results.json"))
    assert len(files) == 1, files  # written once, by rank 0
    for name in RESULTS_FILES:
        assert (files[0].parent / name).read_bytes() == (single / name).read_bytes(), name
    # Per-sample tables (npz files carry their write time, so compared by content): every split, every column.
    exported = {path.stem: read_table(path) for path in (files[0].parent / "samples").glob("*.npz")}
    assert set(exported) == {"in_domain", "speckle_noise@5", "pixelate@5", "few", "stream"}
    assert_tables_equal(exported, {stem: read_table(single / "samples" / f"{stem}.npz") for stem in exported})
    assert_tables_equal(read_tables(files[0].parent / "analysis.npz"), read_tables(single / "analysis.npz"))
    counts = json.loads((single / "results.json").read_text())["num_samples"]
    assert counts == {"in_domain": 6, "speckle_noise@5": 8, "pixelate@5": 8, "few": 3, "stream": 25}
    assert result.stdout.count("Top-1 accuracy") + result.stderr.count("Top-1 accuracy") == 2  # two runs, rank 0
    for quietened in ("LeafSpec", "💡 Tip"):  # silenced in every process
        assert quietened not in result.stderr + result.stdout


def test_two_processes_merge_several_experts_as_one(two_processes, single_k):
    (results,) = two_processes[3].rglob("results.json")
    for name in RESULTS_FILES:
        assert (results.parent / name).read_bytes() == (single_k / name).read_bytes(), name
    exported = {path.stem: read_table(path) for path in (results.parent / "samples").glob("*.npz")}
    assert_tables_equal(exported, {stem: read_table(single_k / "samples" / f"{stem}.npz") for stem in exported})
    assert "w/t3/lora" in exported["stream"] and "pred/expert:full" in exported["stream"]


def test_what_ddp_spawn_sends_to_its_processes_pickles(arguments, tmp_path, monkeypatch):
    """ddp_spawn differs from ddp (above, 2 processes) in what it needs of the run: the module and the data module
    are pickled, before their set-up, into processes that import the package afresh (the module's import silences
    Lightning's messages there). Checked without the half minute those processes take to start."""
    import pickle

    from tcube_lightning.cli import app as cli

    captured = {}

    def capture(self, model, datamodule, **kwargs):  # the Trainer's test, stopped before anything is set up
        captured.update(m=model, d=datamodule)

    monkeypatch.setattr(cli.Trainer, "test", capture)
    cli.main([*arguments, "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}"])
    model, data = pickle.loads(pickle.dumps((captured["m"], captured["d"])))
    assert model.model_plan == captured["m"].model_plan and data.sources == captured["d"].sources


def test_another_thread_count_agrees_to_float32_rounding(arguments, single, tmp_path):
    """README's statement for runs on other thread counts (1 process on 2 threads here, against 1 thread): the
    products sum in another order, so probabilities and what comes from them agree to rounding, and predictions,
    hence accuracies, are the same (none of these samples is a near tie)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, other = run_cli_in_process([*arguments, "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}"])
    finally:
        torch.set_num_threads(threads)
    ours, theirs = (json.loads((folder / "results.json").read_text()) for folder in (single, other))
    assert ours["accuracy"] == theirs["accuracy"] and ours["num_samples"] == theirs["num_samples"]
    for split, per_method in ours["metrics"].items():
        for method, values in per_method.items():
            for name in ("ece", "nll"):  # −log p moves by at most twice a logit's change, |acc − conf| by one
                assert values[name] == pytest.approx(theirs["metrics"][split][method][name], abs=2 * LOGITS_ATOL)
    for path in (single / "samples").glob("*.npz"):
        a, b = read_table(path), read_table(other / "samples" / path.name)
        for column in a:
            if column.startswith("pred/"):
                np.testing.assert_array_equal(a[column], b[column], err_msg=column)
            elif column.startswith("prob/"):  # softmax moves by at most half a logit's change
                np.testing.assert_allclose(a[column], b[column], atol=LOGITS_ATOL, rtol=0, err_msg=column)


def test_two_processes_predict_the_same_tables_as_one(two_processes, arguments, clip_pair, tmp_path):
    """predict under DDP: each source's table (rows in the one-process order, every column) as one process writes
    it. The one-process run on one thread, as each of the two processes."""
    import pyarrow.parquet as pq

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([*predict_arguments(arguments, clip_pair), "--trainer.devices=1", f"--model.results_dir={tmp_path}"])
    finally:
        torch.set_num_threads(threads)
    two = two_processes[2] / "predictions"
    for source, rows in (("in", 8), ("few", 3)):
        ours, theirs = (pq.read_table(f / f"{source}.parquet").to_pydict() for f in (tmp_path / "predictions", two))
        assert ours == theirs and ours["image"] == [str(i) for i in range(rows)], source
        assert (tmp_path / "predictions" / f"{source}.csv").read_bytes() == (two / f"{source}.csv").read_bytes()
