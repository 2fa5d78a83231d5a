"""The LightningModule's argument checks that need neither model nor data, run when the module is made: each
error names its option (``model.…``) before any expensive work starts."""

from __future__ import annotations

from pathlib import Path

from tcube_lightning.errors import InputError
from tcube_lightning.merging.methods import DEFAULT_FAMILIES, METHOD_FAMILIES
from tcube_lightning.reporting.results import check_results_dir


def check_run_options(
    resume: bool,
    results_dir: str | None,
    overwrite: bool,
    clusters: int,
    heads: str,
    head_tolerance: float,
    samplewise: str,
) -> None:
    """Where results go (writable; earlier results kept unless resumed or overwritten) and the engine's modes."""
    if resume and results_dir is None:
        raise InputError("model.resume needs model.results_dir: the folder whose results.json to continue")
    if results_dir is not None:
        check_results_dir(results_dir, resume, overwrite)
    if clusters < 1:
        raise InputError(f"model.clusters must be >= 1, got {clusters}")
    if heads not in ("interpolated", "exact") or head_tolerance <= 0:
        raise InputError(f"model.heads {heads!r} (interpolated or exact) or head_tolerance {head_tolerance} (> 0)")
    if samplewise not in ("auto", "vectorized", "loop"):
        raise InputError(f"model.samplewise must be 'auto', 'vectorized' or 'loop', got {samplewise!r}")


def method_families(methods: list[str] | str | None) -> list[str]:
    """The method families to evaluate (all by default); ``--model.methods t3`` gives one as a string."""
    methods = [methods] if isinstance(methods, str) else methods
    unknown = sorted(set(methods or ()) - set(METHOD_FAMILIES))
    if unknown:
        raise InputError(f"model.methods: unknown method(s) {unknown}; available: {list(METHOD_FAMILIES)}")
    return list(methods or DEFAULT_FAMILIES)


def check_prediction_options(results_dir: str | None, resume: bool, overwrite: bool) -> None:
    """predict writes each source's table whole, into a folder of its own run."""
    if resume:
        raise InputError("model.resume continues an interrupted test run; predict writes each table whole: run again")
    if results_dir is not None and (Path(results_dir) / "predictions").exists() and not overwrite:
        raise InputError(
            f"model.results_dir: {results_dir} already holds predictions/ from an earlier run; give --model.overwrite "
            "true to replace them, or another folder"
        )
