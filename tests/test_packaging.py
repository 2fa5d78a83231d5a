"""The package as users install it: a wheel with its data files and console script, `python -m`, the Dockerfile."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

from helpers import REPO, cli_args, subprocess_env


def test_wheel_contains_the_package_configs_and_console_script(tmp_path):
    # The environment's setuptools builds it: an isolated build environment would add 5 s of installing, and
    # what the wheel holds comes from pyproject.toml either way (the Dockerfile's install builds in isolation).
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("tcube_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "tcube_lightning/model_configs/tcube-tiny-clip.json" in names
    assert "tcube_lightning/evaluation/module.py" in names
    assert re.search(r"tcube-lightning\s*=\s*tcube_lightning\.cli\.entry:main", entry_points)


def test_the_environment_make_builds_has_the_declared_commands(tmp_path):
    """make installs the package into .venv (editable), so its commands run from any folder: the table's
    (which imports no torch) answers its --help, and the main command reads a checkpoint's format."""
    binaries = os.path.dirname(sys.executable)
    table = subprocess.run(
        [os.path.join(binaries, "tcube-lightning-table"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert table.returncode == 0 and "--overwrite" in table.stdout
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    main = subprocess.run(
        [os.path.join(binaries, "tcube-lightning"), "inspect", "notes.txt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=subprocess_env(),
    )  # fmt: skip
    assert main.returncode == 2 and "notes.txt is not a checkpoint file" in main.stderr
    listing = subprocess.run(  # the list of commands, without importing Lightning or torch (Python's import log)
        [sys.executable, "-X", "importtime", "-m", "tcube_lightning", "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=subprocess_env(),
    )  # fmt: skip
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in listing.stderr.splitlines()}
    assert listing.returncode == 0 and "inspect" in listing.stdout and not imported & {"lightning", "torch"}
    makefile = (REPO / "Makefile").read_text()
    assert "-m pip install -q --no-deps -e ." in makefile
    clean = next(line for line in makefile.splitlines() if line.startswith("\trm -rf"))
    assert "runs" not in clean.split()  # results are never make's to remove


def test_dockerfile_installs_the_pinned_files_and_copies_files_that_exist():
    dockerfile = (REPO / "Dockerfile").read_text()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which does not exist"
    assert "pip install --no-cache-dir -r requirements.txt" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    assert 'ENTRYPOINT ["python", "main.py"]' in dockerfile


def test_sigterm_stops_the_run_with_a_failing_exit_status(clip_pair, npz_root, tmp_path):
    """A scheduler's preemption, SIGTERM to the whole process group (the run and its DataLoader workers): the finished
    split stays in results.json, which names the missing one, and the run says how to resume it. The one run in a
    fresh process of the command line, through ``python -m tcube_lightning`` (the other cases, bad input's exit
    status 2 among them, run the same entry point in-process)."""
    out = tmp_path / "results"
    args = cli_args(
        clip_pair,
        npz_root,
        tmp_path,
        "--data.batch_size=1",
        "--data.num_workers=2",
        f"--model.results_dir={out}",
        "--model.methods=[zeroshot, t3, t3_batch]",
        '--data.sources={"short": "tiny_b.npz", "long": "tiny_a.npz"}',
    )  # the split under way when the signal comes: 37 batches, far longer than one poll
    env = subprocess_env()
    run = subprocess.Popen(
        [sys.executable, "-m", "tcube_lightning", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a job scheduler's
    )
    deadline = time.monotonic() + 300
    while not (out / "results.json").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)  # split "short" (21 batches) is written; split "long" (37) is under way
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"stopped by SIGTERM before the last split; {out}/results.json holds the splits finished so far" in stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["accuracy"]) == ["short"]
    assert results["complete"] is False and results["missing_splits"] == ["long"]
