"""Results files: written atomically so a failed run never leaves a half-written file behind."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def accuracy_table(accuracy: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per method, one column per split, top-1 accuracy in percent."""
    splits = list(accuracy)
    methods = list(dict.fromkeys(m for split in splits for m in accuracy[split]))
    lines = ["| method | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for method in methods:
        cells = [f"{100 * accuracy[s][method]:.2f}" if method in accuracy[s] else "" for s in splits]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    """Dataclass settings (given in Python rather than through the CLI) as plain dicts."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_results(results_dir: str | Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.md`` (the accuracy table and λ summary)."""
    results_dir = Path(results_dir)
    json_path, md_path = results_dir / "results.json", results_dir / "results.md"
    markdown = "## Top-1 accuracy (%)\n\n" + accuracy_table(results["accuracy"])
    markdown += (
        "\n## λ per split\n\n| split | samples | λ min | λ mean | λ max | JS mean |\n|---|---:|---:|---:|---:|---:|\n"
    )
    for split, stats in results["coefficients"].items():
        markdown += (
            f"| {split} | {results['num_samples'][split]} | {stats['lambda_min']:.4f} | {stats['lambda_mean']:.4f} "
            f"| {stats['lambda_max']:.4f} | {stats['js_mean']:.4f} |\n"
        )
    for split, diag in results.get("diagnostics", {}).items():
        markdown += (
            f"\n## Decision quadrants: {split}\n\n| pretrained / expert | samples | JS mean |\n|---|---:|---:|\n"
        )
        for quadrant, cell in diag["quadrants"].items():
            markdown += f"| {quadrant} | {cell['count']} | {cell['js_mean']:.4f} |\n"
        if "flips_between_lambda_extremes" in diag:
            flips = diag["flips_between_lambda_extremes"]
            markdown += f"\nSamples whose prediction differs between the models at λ_min and λ_max: {flips}\n"
    write_atomic(json_path, json.dumps(results, indent=2, default=_jsonable) + "\n")
    write_atomic(md_path, markdown)
    return json_path, md_path
