"""Two CPU processes (gloo) give the same results files as one, byte for byte: no sample counted twice, none
dropped, the same batches (so batch-wise T³ is unchanged), a process with no batch of a split included.

Run through the command line in a subprocess: DDP inside pytest re-launches pytest itself.
"""

import pytest
from conftest import write_medmnist_npz
from test_cli import cli_args, run_cli_subprocess

# Batch 24: split a (37 samples) is 2 batches, one per process; split b (21) is 1 batch, so process 1 reads none.
BATCH = "--data.batch_size=24"


def run(clip_pair, npz_root, out, *extra):
    args = cli_args(clip_pair, npz_root, out, BATCH, "--model.gamma=20", "--trainer.accelerator=cpu", *extra)
    result = run_cli_subprocess(args, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    files = list(out.rglob("results.json"))
    assert len(files) == 1, files  # written once, by rank 0
    return files[0].parent, result


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_write_the_same_results_as_one(clip_pair, npz_root, tmp_path, strategy):
    single, _ = run(clip_pair, npz_root, tmp_path / "one", "--trainer.devices=1")
    double, result = run(clip_pair, npz_root, tmp_path / "two", "--trainer.devices=2", f"--trainer.strategy={strategy}")
    for name in ("results.json", "results.md", "summary.csv", "summary.json", "summary.md"):
        assert (double / name).read_bytes() == (single / name).read_bytes(), name
    assert '"num_samples": {\n    "a": 37,\n    "b": 21\n  }' in (single / "results.json").read_text()
    assert result.stdout.count("Top-1 accuracy") + result.stderr.count("Top-1 accuracy") == 1


def test_on_the_fly_corruptions_are_the_same_in_two_processes(clip_pair, tmp_path):
    write_medmnist_npz(tmp_path / "breastmnist.npz", 8, 2)
    args = [
        "test", "--model.arch=tcube-tiny-clip", f"--model.pretrained_checkpoint={clip_pair[0]}",
        f"--model.expert_checkpoint={clip_pair[1]}", "--model.methods=[zeroshot, t3, t3_batch, dare]",
        f"--data.root={tmp_path}", "--data.modality=breast", "--data.splits=[in_domain, corrupted]",
        "--data.size=28", "--data.image_size=28", "--data.corruption_source=on_the_fly", "--data.batch_size=3",
        "--data.corruptions=[speckle_noise, pixelate]", "--data.severities=[5]", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--model.plots=false", "--seed_everything=0",
    ]  # fmt: skip
    folders = {}
    for devices in (1, 2):
        out = tmp_path / f"runs{devices}"
        done = run_cli_subprocess([*args, f"--trainer.devices={devices}", f"--trainer.default_root_dir={out}"], 600)
        assert done.returncode == 0, done.stderr[-4000:]
        (folders[devices],) = [p.parent for p in out.rglob("results.json")]
    assert (folders[2] / "results.json").read_bytes() == (folders[1] / "results.json").read_bytes()
    assert '"speckle_noise@5": 8' in (folders[1] / "results.json").read_text()
