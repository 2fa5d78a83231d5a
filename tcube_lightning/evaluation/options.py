"""The LightningModule's argument checks that need neither model nor data, run when the module is made: each
error names its option (``model.…``) before any expensive work starts."""

from __future__ import annotations

import difflib
from pathlib import Path

from lightning import LightningDataModule

from tcube_lightning.data.splitnames import is_corrupted
from tcube_lightning.errors import InputError
from tcube_lightning.loading import ModelPlan
from tcube_lightning.merging.methods import K_EXPERT_DEFAULTS, METHOD_FAMILIES, ONE_EXPERT_DEFAULTS, TWO_MODEL
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


def method_families(methods: list[str] | str | None, experts: int = 1) -> list[str]:
    """The method families to evaluate (by default every family for ``experts`` experts but AdaMerging's);
    ``--model.methods t3`` gives one as a string. With several experts the methods of two models are refused by
    name, with the reason."""
    methods = [methods] if isinstance(methods, str) else methods
    if methods is not None and not methods:
        raise InputError("model.methods: an empty list; name the methods to evaluate, or leave it out for the defaults")
    unknown = sorted(set(methods or ()) - set(METHOD_FAMILIES))
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, METHOD_FAMILIES, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(f"model.methods: unknown method(s) {unknown}{hint}; available: {list(METHOD_FAMILIES)}")
    refused = [m for m in methods or () if m in TWO_MODEL] if experts > 1 else []
    if refused:
        raise InputError(
            f"model.methods: {refused} merge the generalist with one expert (an interpolation, a ratio of two models' "
            f"confidences, a Beta mixture of one coefficient); with {experts} experts: {list(K_EXPERT_DEFAULTS)} and "
            "AdaMerging's"
        )
    return list(methods or (ONE_EXPERT_DEFAULTS if experts == 1 else K_EXPERT_DEFAULTS))


def check_precision(precision: str, device: str) -> None:
    """The Trainer's precision is one the engine runs: float32, bfloat16 (mixed or true) anywhere, float16 on a GPU."""
    if precision.startswith("64"):
        raise InputError(
            f"trainer.precision: {precision} is not supported (the merge buffers, heads and tolerances are float32's); "
            "use 32-true, or bf16-mixed / 16-mixed for speed"
        )
    if precision.startswith("16") and device == "cpu":
        raise InputError(
            f"trainer.precision: {precision} on the CPU: PyTorch's float16 kernels there are tens of times slower than "
            "float32's; use 32-true or bf16-mixed on the CPU, 16-mixed or 16-true on a GPU"
        )


def check_batch_limit(limit: int | float, stage: str) -> None:
    """A run reads at least one batch of every split: with ``limit_<stage>_batches`` 0 Lightning would read none and
    the run end as if it had succeeded, having evaluated nothing."""
    if limit == 0:
        raise InputError(
            f"trainer.limit_{stage}_batches: 0 reads no batch, so nothing would be evaluated; give a number of batches "
            "or a fraction of each split > 0, or leave it out"
        )


def check_prediction_options(results_dir: str | None, resume: bool, overwrite: bool) -> None:
    """predict writes each source's table whole, into a folder of its own run."""
    if resume:
        raise InputError("model.resume continues an interrupted test run; predict writes each table whole: run again")
    if results_dir is not None and (Path(results_dir) / "predictions").exists() and not overwrite:
        raise InputError(
            f"model.results_dir: {results_dir} already holds predictions/ from an earlier run; give --model.overwrite "
            "true to replace them, or another folder"
        )


def check_data_fits(
    plan: ModelPlan,
    data: LightningDataModule,
    experts: list[str],
    mce_reference: str,
    methods: list[str],
    predicting: bool,
) -> None:
    """What only the data and the model settings together can tell, checked before any model loads (``predicting``:
    the settings only ``test`` uses are left aside, see the data module)."""
    plan.check_preprocessing(data.image_size, data.mean, data.std)
    if predicting:
        return
    if data.expert_of and len(experts) == 1:
        raise InputError(
            "data.expert_of names each split's domain expert among several (model.experts); this run has one expert: "
            "leave data.expert_of out"
        )
    unknown = sorted(set(data.domain_experts.values()) - set(experts))
    if unknown:
        raise InputError(f"data.expert_of: {unknown} are not experts of this run; its experts: {experts}")
    if any(is_corrupted(split) for split in data.split_names) and mce_reference not in methods:
        raise InputError(  # corrupted splits: CE needs the reference method
            f"model.mce_reference: {mce_reference!r} is not among the evaluated methods {methods}"
        )
