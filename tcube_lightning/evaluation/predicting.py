"""The LightningModule's ``predict`` life cycle: the test loop's batches and per-sample tables without labels or
metrics, each source's table written once the source is finished (``reporting.predictions``)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tcube_lightning.reporting.predictions import FOLDER, prediction_table, write_prediction_table, write_summary


class PredictHooks:
    """The LightningModule's ``predict`` hooks (mixed into ``TCubeModule``): the test loop's batches and per-sample
    tables without labels or metrics; each source's table written once the source is finished, on rank 0, rows in
    the one-process order."""

    def predict_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, dataloader_idx)

    def on_predict_start(self) -> None:
        self._start()
        self.prediction_counts: dict[str, dict] = {}

    def on_predict_epoch_end(self) -> None:
        self._finish_splits_before(len(self.split_names))
        if not self.trainer.is_global_zero:
            return
        folder = self.report.results_dir / FOLDER
        sources = {s: {**n, "complete": n["rows"] == n["total"]} for s, n in self.prediction_counts.items()}
        summary = {
            "complete": all(n["complete"] for n in sources.values()),
            "sources": sources,
            "methods": list(self.methods),
            "classnames": self.split_classnames,
            **self.report.details,
            "config": self.run_config,
        }
        write_summary(folder, summary)
        short = {s: f"{n['rows']} of {n['total']}" for s, n in sources.items() if not n["complete"]}
        if short:
            rank_zero_warn(
                f"partial predictions: fewer images were read than the sources hold ({short}; "
                "trainer.limit_predict_batches or fast_dev_run): predictions.json says complete: false"
            )
        rank_zero_info(f"Predictions written to {folder}: <source>.csv and <source>.parquet for {list(sources)}")

    def _write_predictions(self, split: str) -> None:
        """A finished source: its table (every process takes part in the gather), written by rank 0."""
        table = self.tables[split].gather()
        if self.trainer.is_global_zero:
            self._remove_replaced_run()
            identities = self.trainer.datamodule.datasets[split].base.identities
            columns = prediction_table(table, identities, self.split_classnames[split], list(self.methods))
            write_prediction_table(self.report.results_dir / FOLDER, split, columns)
            self.prediction_counts[split] = {"rows": len(table["index"]), "total": len(identities)}
        self.results_written = True
