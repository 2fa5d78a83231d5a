"""The LightningModule's ``predict`` life cycle: the test loop's batches and per-sample tables without labels or
metrics, each source's table written once the source is finished (``reporting.predictions``)."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tcube_lightning.evaluation.batches import readable_rows
from tcube_lightning.reporting.metrics import gather_objects
from tcube_lightning.reporting.predictions import FOLDER, prediction_table, write_prediction_table, write_summary


class PredictHooks:
    """The LightningModule's ``predict`` hooks (mixed into ``TCubeModule``): the test loop's batches and per-sample
    tables without labels or metrics; each source's table written once the source is finished, on rank 0, rows in
    the one-process order."""

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """A batch whose rows that could not be read (``readable``) are kept aside, the others predicted (the
        calibration split's are labelled, and all read)."""
        self._finish_splits_before(dataloader_idx)
        split = self.split_names[dataloader_idx]
        if "readable" in batch:
            self.skipped[split].append(batch["label"][~batch["readable"]].cpu())
            batch = readable_rows(batch)
        if len(batch["label"]):
            self._step(batch, dataloader_idx)
        else:  # every image of the batch unreadable
            self.batches_seen[split] += 1

    def on_predict_start(self) -> None:
        self._start()
        self.prediction_counts: dict[str, dict] = {}
        self.skipped: dict[str, list[torch.Tensor]] = {split: [] for split in self.split_names}
        """Rows that could not be read, per source, on this process."""

    def on_predict_epoch_end(self) -> None:
        self._finish_splits_before(len(self.split_names))
        if not self.trainer.is_global_zero:
            return
        folder = self.report.results_dir / FOLDER
        sources = {
            s: {**n, "complete": n["rows"] + len(n["skipped"]) == n["total"]} for s, n in self.prediction_counts.items()
        }
        summary = {
            "complete": all(n["complete"] for n in sources.values()),
            "sources": sources,
            "methods": list(self.methods),
            "classnames": self.split_classnames,
            **self.report.details,
            "config": self.run_config,
        }
        write_summary(folder, summary)
        unreadable = {s: len(n["skipped"]) for s, n in sources.items() if n["skipped"]}
        if unreadable:
            rank_zero_warn(
                f"images that could not be read were skipped ({unreadable} per source): predictions.json lists each "
                "with why, and the tables' `skipped` column says so on its row"
            )
        for source, counts in sources.items():
            if counts["rows"] == 0 and counts["skipped"]:
                first, why = next(iter(counts["skipped"].items()))
                rank_zero_warn(f"no image of source {source!r} could be read (the first, {first}: {why})")
        short = {s: f"{n['rows']} of {n['total']}" for s, n in sources.items() if not n["complete"]}
        if short:
            rank_zero_warn(
                f"partial predictions: fewer images were read than the sources hold ({short}; "
                "trainer.limit_predict_batches or fast_dev_run): predictions.json says complete: false"
            )
        rank_zero_info(f"Predictions written to {folder}: <source>.csv and <source>.parquet for {list(sources)}")

    def _write_predictions(self, split: str) -> None:
        """A finished source: its table (every process takes part in the gathers), written by rank 0, with the rows
        that could not be read listed as skipped, each with why."""
        table = self.tables[split].gather()
        skipped_rows = sorted(int(r) for part in gather_objects(self.skipped[split]) for rows in part for r in rows)
        if self.trainer.is_global_zero:
            self._remove_replaced_run()
            source = self.trainer.datamodule.datasets[split].base
            skipped = {row: source.why_unreadable(row) for row in skipped_rows}
            columns = prediction_table(
                table, source.identities, self.split_classnames[split], list(self.methods), skipped
            )
            write_prediction_table(self.report.results_dir / FOLDER, split, columns)
            self.prediction_counts[split] = {
                "rows": len(table.get("index", ())),
                "total": len(source.identities),
                "skipped": {source.identities[row]: why for row, why in skipped.items()},
            }
        self.results_written = True
