"""Two CPU processes (gloo) give the same results as one: no sample counted twice, none dropped.

Run through the command line in a subprocess: DDP inside pytest re-launches pytest itself.
"""

import json

import pytest
from test_cli import SPLITS, cli_args, run_cli_subprocess


def run(clip_pair, npz_root, out, *extra):
    args = cli_args(
        clip_pair, npz_root, out, "--data.batch_size=8", "--model.gamma=20", "--trainer.accelerator=cpu", *extra
    )
    result = run_cli_subprocess(args, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    files = list(out.rglob("results.json"))
    assert len(files) == 1, files  # written once, by rank 0
    return json.loads(files[0].read_text()), result


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_two_processes_match_one(clip_pair, npz_root, tmp_path, strategy):
    single, _ = run(clip_pair, npz_root, tmp_path / "one", "--trainer.devices=1")
    double, result = run(clip_pair, npz_root, tmp_path / "two", "--trainer.devices=2", f"--trainer.strategy={strategy}")
    assert double["num_samples"] == single["num_samples"] == {"a": 37, "b": 21}  # 37 and 21: not multiples of 2 × 8
    for split in SPLITS:
        assert double["accuracy"][split] == pytest.approx(single["accuracy"][split], abs=1e-9)
        assert double["coefficients"][split] == pytest.approx(single["coefficients"][split], abs=1e-6)
        for quadrant, cell in single["diagnostics"][split]["quadrants"].items():
            assert double["diagnostics"][split]["quadrants"][quadrant]["count"] == cell["count"]
            # fp32 forwards of differently composed batches differ in the last bits
            assert double["diagnostics"][split]["quadrants"][quadrant]["js_mean"] == pytest.approx(
                cell["js_mean"], abs=1e-6, nan_ok=True
            )
        for name, mixture in single["clusters"][split].items():
            assert double["clusters"][split][name]["means"] == pytest.approx(mixture["means"], abs=1e-6)
    assert result.stdout.count("Top-1 accuracy") + result.stderr.count("Top-1 accuracy") == 1
