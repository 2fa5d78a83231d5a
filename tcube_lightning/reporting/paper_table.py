"""The paper's table across modalities, from finished runs (their results.json): one row per method; for each
modality the in-domain and base-to-novel top-1, the mean top-1 over the corrupted splits and mCE; then the mean of
each over the modalities. Written as Markdown, CSV and LaTeX, with the runs it read listed.

Runs that do not fit together are refused, saying how: a modality twice, an incomplete run, other methods, or other
settings (every model and data setting but the expert, the modality and its own splits' files and class names, and
what does not change numbers).

    python -m tcube_lightning.reporting.paper_table runs/blood runs/breast runs/retina runs/oct runs/pneumonia \\
        --out paper_table
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from tcube_lightning.data.splitnames import is_corrupted
from tcube_lightning.errors import InputError
from tcube_lightning.reporting.numeric_settings import RESUME_IGNORES, resume_relevant
from tcube_lightning.reporting.results import write_atomic

QUANTITIES = {"in_domain": "in-domain", "base_to_novel": "base-to-novel", "corrupted": "corrupted", "mCE": "mCE"}
"""Each modality's columns and their headings; top-1 in percent, mCE as a ratio."""
PER_MODALITY = {
    "model": ("expert_checkpoint",),
    "data": ("root", "modality", "sources", "flag", "classnames", "templates", "corruptions", "mixes"),
}
"""Settings a modality's run has of its own (its expert, data and prompts); every other must be the same."""


def read_run(path: Path) -> tuple[str, dict[str, Any], Path]:
    """A run's modality, results and results.json (``path``: the file or its folder)."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{path}: no results.json (give a run's folder or its results.json)")
    try:
        results = json.loads(file.read_text())
        modality = results["config"]["data"]["modality"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{file}: not a tcube-lightning results file of a modality's run ({err})") from err
    if modality is None:
        raise InputError(f"{file}: a run without data.modality; the table's columns are the modalities'")
    if isinstance(modality, list):
        if len(modality) > 1:
            raise InputError(
                f"{file}: a run of several modalities {modality}; the table takes one run per modality (each with its "
                "own in-domain, base-to-novel and corrupted splits)"
            )
        modality = modality[0]
    return modality, results, file


def check_fit(runs: list[tuple[str, dict[str, Any], Path]]) -> None:
    """One run per modality, each complete, with the same methods and settings; else an error saying what differs."""
    modalities = [modality for modality, _, _ in runs]
    repeated = sorted({m for m in modalities if modalities.count(m) > 1})
    if repeated:
        raise InputError(f"modalities given more than once: {repeated}; give one run per modality")
    for modality, results, file in runs:
        if not results.get("complete", False):
            missing = results.get("missing_splits") or list(results.get("partial_splits", {}))
            raise InputError(f"{file} ({modality}) is not complete: {missing}; complete it with --model.resume true")
    first_modality, first, _ = runs[0]
    methods = list(next(iter(first["accuracy"].values())))
    settings = comparable(first["config"])
    for modality, results, file in runs[1:]:
        theirs = list(next(iter(results["accuracy"].values())))
        if theirs != methods:
            raise InputError(
                f"{file} ({modality}) evaluated other methods than {first_modality}: {theirs} vs {methods}"
            )
        other = comparable(results["config"])
        differing = [
            f"{group}.{key}: {settings[group].get(key)!r} ({first_modality}) vs {other[group].get(key)!r} ({modality})"
            for group in settings
            for key in sorted(set(settings[group]) | set(other[group]))
            if settings[group].get(key) != other[group].get(key)
        ]
        if differing:
            raise InputError(f"{file} was run with other settings than {first_modality}'s: {'; '.join(differing)}")


def comparable(config: dict) -> dict[str, dict]:
    """The settings runs of different modalities must share: the numbers-relevant ones less each modality's own."""
    relevant = resume_relevant(config)
    return {
        group: {k: v for k, v in relevant.get(group, {}).items() if k not in PER_MODALITY.get(group, ())}
        for group in RESUME_IGNORES
    }


def table_rows(runs: list[tuple[str, dict[str, Any], Path]]) -> list[dict[str, Any]]:
    """One row per method: ``<modality>/<quantity>`` for each run, then ``mean/<quantity>`` over the modalities."""
    rows = []
    for method in next(iter(runs[0][1]["accuracy"].values())):
        row: dict[str, Any] = {"method": method}
        for modality, results, _ in runs:
            accuracy = results["accuracy"]
            corrupted = [accuracy[s][method] for s in accuracy if is_corrupted(s)]
            row[f"{modality}/in_domain"] = accuracy.get("in_domain", {}).get(method, math.nan)
            row[f"{modality}/base_to_novel"] = accuracy.get("base_to_novel", {}).get(method, math.nan)
            row[f"{modality}/corrupted"] = math.fsum(corrupted) / len(corrupted) if corrupted else math.nan
            mce = results.get("corruption_errors", {}).get("ce", {}).get(method, {}).get("mCE")
            row[f"{modality}/mCE"] = math.nan if mce is None else mce
        for quantity in QUANTITIES:
            values = [row[f"{modality}/{quantity}"] for modality, _, _ in runs]
            row[f"mean/{quantity}"] = (
                math.nan if any(math.isnan(v) for v in values) else math.fsum(values) / len(values)
            )
        rows.append(row)
    return rows


def cell(column: str, value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if column.endswith("/mCE") else f"{100 * value:.2f}"


def write_tables(folder: Path, rows: list[dict[str, Any]], runs: list[tuple[str, dict[str, Any], Path]]) -> list[Path]:
    """table.md, table.csv (the values as results.json has them: top-1 as a fraction) and table.tex (booktabs)."""
    groups = [modality for modality, _, _ in runs] + ["mean"]
    columns = [f"{group}/{quantity}" for group in groups for quantity in QUANTITIES]
    read = [f"{modality}: {file}" for modality, _, file in runs]
    headings = " | ".join(f"{group} {QUANTITIES[q]}" for group in groups for q in QUANTITIES)
    markdown = f"| method | {headings} |\n|---|" + "---:|" * len(columns) + "\n"
    markdown += "".join(f"| {row['method']} | " + " | ".join(cell(c, row[c]) for c in columns) + " |\n" for row in rows)
    markdown += "\nTop-1 in %; corrupted: the mean top-1 over the corrupted splits; mCE against each run's reference.\n"
    markdown += "\nRuns read:\n\n" + "".join(f"- {line}\n" for line in read)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["method", *columns])
    writer.writeheader()
    writer.writerows(rows)
    spec = "l" + "".join("|" + "r" * len(QUANTITIES) for _ in groups)
    tops = " & ".join(rf"\multicolumn{{{len(QUANTITIES)}}}{{c}}{{{group}}}" for group in groups)
    subs = " & ".join(QUANTITIES[q] for _ in groups for q in QUANTITIES)
    latex = "".join(f"% {line}\n" for line in ["Runs read:", *read])
    latex += f"\\begin{{tabular}}{{{spec}}}\n\\toprule\n & {tops} \\\\\nmethod & {subs} \\\\\n\\midrule\n"
    latex += "".join(
        row["method"].replace("_", r"\_") + " & " + " & ".join(cell(c, row[c]) for c in columns) + " \\\\\n"
        for row in rows
    )
    latex += "\\bottomrule\n\\end{tabular}\n"
    paths = [folder / name for name in TABLE_FILES]
    for path, content in zip(paths, (markdown, text.getvalue(), latex), strict=True):
        write_atomic(path, content)
    return paths


TABLE_FILES = ("table.md", "table.csv", "table.tex")


def check_out(folder: Path, overwrite: bool) -> None:
    """``--out`` is a folder this command may write its tables in: not a file, creatable, and holding no tables of an
    earlier call unless ``overwrite``."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out: {folder} is a file; give a folder for {', '.join(TABLE_FILES)}")
    earlier = [name for name in TABLE_FILES if (folder / name).exists()]
    if earlier and not overwrite:
        raise InputError(f"--out: {folder} already holds {earlier}; give --overwrite to replace them, or another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out: cannot create the folder {folder} ({err.strerror or err})") from err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tcube-lightning-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished runs: their folders or results.json files")
    parser.add_argument("--out", type=Path, default=Path("paper_table"), help="folder for table.md, .csv and .tex")
    parser.add_argument("--overwrite", action="store_true", help="replace the tables an earlier call wrote in --out")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(path) for path in args.runs]
        check_fit(runs)
        rows = table_rows(runs)
        check_out(args.out, args.overwrite)
        try:
            paths = write_tables(args.out, rows, runs)
        except OSError as err:
            raise InputError(f"--out: cannot write in {args.out} ({err.strerror or err})") from err
    except InputError as err:
        print(f"tcube-lightning-table: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"The table across {len(runs)} modalities: {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    main()
