"""One folder per run: a run's results, config.yaml, TensorBoard events and figures live together, a run that
finishes no split leaves nothing of its own behind, and an overwrite replaces what the earlier run wrote.

A file is this run's when it was written since the run started (``started``, a wall-clock time): the folder may hold
an earlier run's files (resume, overwrite) and the user's own, which are never touched.
"""

from __future__ import annotations

import contextlib
import fnmatch
import shutil
from pathlib import Path

RUN_ARTIFACTS = (
    "results.json",
    "results.md",
    "summary.md",
    "summary.csv",
    "summary.json",
    "cost.json",
    "analysis.npz",
    "config.yaml",
    "hparams.yaml",
    "plots",
    "samples",
    "predictions",
    "events.out.tfevents.*",
)
"""What a run writes into its folder (files, folders, TensorBoard's event files)."""


def run_artifacts(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, pattern) for pattern in RUN_ARTIFACTS)]


def written_since(path: Path, started: float) -> bool:
    return path.stat().st_mtime >= started


def remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def clear_earlier_run(folder: Path, started: float) -> None:
    """Before an overwriting run writes its first results: what the run it replaces wrote."""
    remove([p for p in run_artifacts(folder) if not written_since(p, started)])


def discard_own(folder: Path, started: float) -> None:
    """After a run that finished no split: what it wrote (the logger's event file, say), then the folder if it is
    left empty."""
    remove([p for p in run_artifacts(folder) if written_since(p, started)])
    with contextlib.suppress(OSError):  # not empty: an earlier run's or the user's files are there
        folder.rmdir()
