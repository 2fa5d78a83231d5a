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
LEAVE_OUT = ("index", "label", "finite", "flip")
"""Per-sample columns of the test tables that mean nothing here (no labels) or repeat the row's identity."""


def prediction_table(
    table: dict[str, np.ndarray], identities: list[str], classnames: list[str], methods: list[str]
) -> dict[str, np.ndarray]:
    """A source's gathered per-sample table as written: the image; each selected method's predicted class (by name)
    and its probability; the two models' own (``zeroshot``, ``expert``) if not selected; then JS, λ and the weights."""
    rows = table["index"].astype(int)
    columns = {IMAGE: np.asarray(identities, dtype=object)[rows]}
    predicted = list(dict.fromkeys([*methods, "zeroshot", "expert"]))
    for method in predicted:
        columns[f"pred/{method}"] = np.asarray(classnames, dtype=object)[table[f"pred/{method}"]]
        columns[f"prob/{method}"] = table[f"prob/{method}"]
    for name, values in table.items():
        if name not in LEAVE_OUT and name not in columns:
            columns[name] = values
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
