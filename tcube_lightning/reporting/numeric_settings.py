"""Which of a run's settings change its numbers: what resume compares with the run it continues, and what the
paper's table requires runs of different modalities to share. Plain Python (the table's command imports only this)."""

from __future__ import annotations

from pathlib import Path

RESUME_IGNORES = {
    "model": ("results_dir", "plots", "samplewise", "compile", "cache_dir", "min_lambda_spread"),
    "data": ("num_workers", "pin_memory", "corruption_cache"),
    "trainer": (),
}
"""Settings that do not change a run's numbers (where files go, how fast, what is drawn or warned about; the
sample-wise paths and compiled forwards agree to float rounding): resume accepts an earlier run that differs in
these. Every other model and data setting must be the same, and so must the Trainer's that change numbers
(``NUMERIC_TRAINER_SETTINGS``)."""


NUMERIC_TRAINER_SETTINGS = ("precision", "deterministic", "benchmark")
"""The Trainer's settings that change a run's numbers (recorded in results.json's config.trainer): its precision
(bf16 and float32 logits differ), deterministic algorithms and cuDNN's benchmark (another kernel, other rounding). The
process and device counts do not: 1 and N processes give the same results."""


def resume_relevant(config: dict) -> dict:
    """The part of a run's configuration that resume compares: without ``RESUME_IGNORES``, data.root resolved."""
    relevant = {}
    for group, ignored in RESUME_IGNORES.items():
        relevant[group] = {k: v for k, v in config.get(group, {}).items() if k not in ignored}
    if relevant["data"].get("root") is not None:
        relevant["data"]["root"] = str(Path(relevant["data"]["root"]).resolve())
    return relevant
