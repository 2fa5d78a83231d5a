"""Resume: an earlier run's results read back, checked to be of the same configuration, and the settings that a
resumed run may change (those that do not change its numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from tcube_lightning.errors import InputError
from tcube_lightning.reporting.numeric_settings import RESUME_IGNORES, resume_relevant
from tcube_lightning.reporting.records import SPLIT_RECORD_KEYS
from tcube_lightning.reporting.samples import read_tables


def trainer_settings(trainer: Trainer) -> dict[str, Any]:
    """The Trainer's settings that change a run's numbers (``NUMERIC_TRAINER_SETTINGS``), as this run has them."""
    return {
        "precision": str(trainer.precision),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "benchmark": bool(torch.backends.cudnn.benchmark),
    }


def read_results(path: Path) -> dict[str, Any]:
    """An earlier run's results.json, checked to hold what resume needs; a clear error naming the file if not."""
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"model.resume: {path} is not valid JSON ({err})") from err
    if not isinstance(results, dict):
        raise InputError(f"model.resume: {path} holds a {type(results).__name__}, not a tcube-lightning results object")
    missing = [key for key in ("config", *SPLIT_RECORD_KEYS) if not isinstance(results.get(key), dict)]
    if missing:
        raise InputError(f"model.resume: {path} lacks {missing}: it was not written by a tcube-lightning run")
    incomplete = [
        f"{key}[{split!r}]" for split in results["accuracy"] for key in SPLIT_RECORD_KEYS if split not in results[key]
    ]
    if incomplete:
        raise InputError(f"model.resume: {path} lacks {incomplete[:5]}: the file was edited or cut")
    return results


def load_previous(results_dir: str | Path, run_config: dict) -> dict[str, dict]:
    """For resume: the split records (and per-sample tables, for the plots) of an earlier run with the same
    numbers-relevant configuration, from results.json and analysis.npz in ``results_dir``."""
    path = Path(results_dir) / "results.json"
    if not path.is_file():  # a requeued job's first start: the same command, nothing to continue yet
        rank_zero_info(f"model.resume: {results_dir} holds no results.json yet; the run starts from its first split")
        return {}
    previous = read_results(path)
    old, new = resume_relevant(previous["config"]), resume_relevant(run_config)
    if "trainer" not in previous["config"]:  # written before the Trainer's settings were recorded: not known
        new["trainer"] = old["trainer"]
    if old != new:
        differing = sorted(
            f"{group}.{key}"
            for group in RESUME_IGNORES
            for key in set(old[group]) | set(new[group])
            if old[group].get(key) != new[group].get(key)
        )
        raise InputError(
            f"model.resume: {path} was written with another configuration (differs in {differing}); "
            "use another model.results_dir or remove that file"
        )
    done = [split for split in previous["accuracy"] if split not in previous.get("partial_splits", {})]
    rank_zero_info(f"Resuming: {len(done)} split(s) already in {path} are skipped: {done}")
    tables = read_tables(Path(results_dir) / ANALYSIS_FILE)
    return {
        split: Previous(
            {key: previous[key][split] for key in SPLIT_RECORD_KEYS}
            | ({"sources": previous["sources"][split]} if split in previous.get("sources", {}) else {}),
            tables.get(split),
        )
        for split in done
    }


ANALYSIS_FILE = "analysis.npz"
"""Every finished split's per-sample analysis columns (``samples.is_analysis_column``), beside results.json: the
plots of a resumed run cover every split."""


class Previous(dict):
    """A split record read back for resume, with the split's per-sample table (None if analysis.npz lacked it)."""

    def __init__(self, record: dict, table: dict[str, np.ndarray] | None) -> None:
        super().__init__(record)
        self.table = table
