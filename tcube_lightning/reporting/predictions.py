"""What ``predict`` writes: one table per source, each image's row with the class each selected method predicts and
its probability, and JS, λ (per ``model.grid`` setting too) and each dynamic method's weight on the expert; as CSV
for people and Parquet for programs (the same columns, typed), beside ``predictions.json`` (what each table holds).

A table is written whole, atomically, once its source is finished: a table on disk is never a partial one, except
where the run was asked to read fewer batches (``limit_predict_batches``), which predictions.json says.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from tcube_lightning.reporting.results import write_atomic

FOLDER = "predictions"
IMAGE = "image"
"""The row's identity: the file's path relative to the source folder, or the row's number in an npz or dataset."""
SKIPPED = "skipped"
"""Why an image could not be read (and so has no predictions); blank for the others."""
LEAVE_OUT = ("index", "label", "finite", "flip")
"""Per-sample columns of the test tables that mean nothing here (no labels) or repeat the row's identity."""


def prediction_table(
    table: dict[str, np.ndarray],
    identities: list[str],
    classnames: list[str],
    methods: list[str],
    skipped: dict[int, str] | None = None,
) -> dict[str, np.ndarray]:
    """A source's gathered per-sample table as written: the image; each selected method's predicted class (by name)
    and its probability; the models' own (``zeroshot``, ``expert`` or each ``expert:<name>``) if not selected; then
    JS, λ and the weights; with a calibration split, each method's decision (``accepted/<method>``) and conformal
    set (``set/<method>``, class names joined by "; ", and ``set_size/<kind>/<method>``); last, ``skipped``: why an
    image could not be read (``skipped``: row → why; its other cells empty), else blank. Rows in the source's order."""
    skipped = skipped or {}
    if "index" not in table:  # no image of the source could be read: every row skipped, with why
        table = {"index": np.zeros(0, dtype=int)} | {
            column: np.zeros(0, dtype=int if column.startswith("pred/") else np.float32)
            for method in dict.fromkeys([*methods, "zeroshot"])
            for column in (f"pred/{method}", f"prob/{method}")
        }
    rows = np.concatenate([table["index"].astype(int), np.asarray(list(skipped), dtype=int)])
    order = np.argsort(rows, kind="stable")

    def with_skipped(values: np.ndarray) -> np.ndarray:
        """The predicted rows' values, then an empty cell (None: blank in the CSV, null in Parquet) per skipped row,
        in row order."""
        if not skipped:
            return values
        return np.concatenate([values.astype(object), np.full(len(skipped), None, dtype=object)])[order]

    columns = {IMAGE: np.asarray(identities, dtype=object)[rows[order]]}
    experts = [name.removeprefix("pred/") for name in table if name.startswith("pred/expert")]  # one, or several
    predicted = list(dict.fromkeys([*methods, "zeroshot", *experts]))
    for method in predicted:
        columns[f"pred/{method}"] = with_skipped(np.asarray(classnames, dtype=object)[table[f"pred/{method}"]])
        columns[f"prob/{method}"] = with_skipped(table[f"prob/{method}"])
    for name, values in table.items():
        if name.startswith("set/"):  # a calibrated prediction set (rows × classes): its classes' names
            values = np.asarray(["; ".join(np.asarray(classnames)[row]) for row in values.astype(bool)], dtype=object)
        if name not in LEAVE_OUT and name not in columns:
            columns[name] = with_skipped(values)
    reasons = [""] * (len(rows) - len(skipped)) + list(skipped.values())
    columns[SKIPPED] = np.asarray(reasons, dtype=object)[order]
    return columns


def write_prediction_table(folder: Path, source: str, columns: dict[str, np.ndarray]) -> list[Path]:
    """``<source>.csv`` and ``<source>.parquet`` in ``folder``, each written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))  # NumPy's scalars print as their shortest exact text
    typed = pa.table({name: pa.array(v.tolist() if v.dtype == object else v) for name, v in columns.items()})
    buffer = pa.BufferOutputStream()
    pq.write_table(typed, buffer)
    paths = [folder / f"{source}.csv", folder / f"{source}.parquet"]
    write_atomic(paths[0], text.getvalue())
    write_atomic(paths[1], buffer.getvalue().to_pybytes())
    return paths


def write_summary(folder: Path, summary: dict) -> None:
    write_atomic(folder / "predictions.json", json.dumps(summary, indent=2) + "\n")
