"""What a run measures and writes: metrics, per-sample tables, split records, results and summary files, figures,
cost, diagnostics, the console table, predictions and the run folder."""
