"""Results files: written atomically so a failed run never leaves a half-written file behind."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tcube_lightning.data.splitnames import is_corrupted, parse_corrupted
from tcube_lightning.errors import InputError


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` in one step. The file gets
    the permissions of any newly created file (0644 under the usual umask), not ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        mode, encoding = ("wb", None) if isinstance(text, bytes) else ("w", "utf-8")
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of a compressed npz file (for ``write_atomic``)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_results_dir(results_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Before any model loads: ``results_dir`` can be written, and holds no earlier run's results unless the run
    continues them (resume) or was asked to replace them (overwrite)."""
    path = Path(results_dir)
    if resume and overwrite:
        raise InputError("model.resume and model.overwrite exclude each other: continue the results or replace them")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"model.results_dir: {existing} exists and is not a folder, so {path} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"model.results_dir: {existing} is not writable")
    if existing != path:  # a folder is made there (permissions alone do not tell: /proc, read-only mounts)
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".tcube-probe-", dir=existing))
        except OSError as err:
            raise InputError(f"model.results_dir: {path} cannot be made in {existing} ({err.strerror})") from err
    if (path / "results.json").exists() and not (resume or overwrite):
        raise InputError(
            f"model.results_dir: {path} already holds results.json from an earlier run; give --model.resume true to "
            "continue it, --model.overwrite true to replace it, or another folder"
        )


def accuracy_table(accuracy: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per method, one column per split, top-1 accuracy in percent."""
    splits = list(accuracy)
    methods = list(dict.fromkeys(m for split in splits for m in accuracy[split]))
    lines = ["| method | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for method in methods:
        cells = [f"{100 * accuracy[s][method]:.2f}" if method in accuracy[s] else "" for s in splits]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _encode(value: Any) -> Any:
    """Dataclass settings (given in Python rather than through the CLI) as plain dicts."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from a results file (tuples become lists, settings dicts)."""
    return json.loads(json.dumps(value, default=_encode))


def write_results(results_dir: str | Path, results: dict[str, Any], note: str | None = None) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.md`` (the accuracy table, ``note`` under it, and λ summary)."""
    results_dir = Path(results_dir)
    json_path, md_path = results_dir / "results.json", results_dir / "results.md"
    markdown = ""
    if results.get("missing_splits"):
        markdown += "## Missing splits\n\nThe run stopped before these splits: every mean and CE here leaves them out "
        markdown += f"(resume completes them): {', '.join(results['missing_splits'])}\n\n"
    if results.get("partial_splits"):
        markdown += "## Partial results\n\nFewer samples were evaluated than these splits hold:\n\n"
        markdown += "".join(f"- {s}: {n['evaluated']} of {n['total']}\n" for s, n in results["partial_splits"].items())
        markdown += "\n"
    markdown += "## Top-1 accuracy (%)\n\n" + accuracy_table(results["accuracy"])
    if note:
        markdown += f"\n{note}\n"
    if results.get("normalised_accuracy"):
        markdown += "\n## Normalised accuracy (%): over the accuracy of each split's domain expert (data.expert_of)\n\n"
        markdown += accuracy_table(results["normalised_accuracy"])
    markdown += coefficients_markdown(results["coefficients"], results["num_samples"])
    for split, diag in results.get("diagnostics", {}).items():
        if not diag:  # several experts: no two-model quadrants
            continue
        markdown += f"\n## Decision quadrants: {split}\n\n| pretrained / expert | samples | JS mean | ρ(JS, DaWin) |\n"
        markdown += "|---|---:|---:|---:|\n"
        for quadrant, cell in diag["quadrants"].items():
            rho = cell.get("pearson_js_dawin")
            rho_text = "–" if rho is None else f"{rho:.3f}"  # undefined: too few samples, or a constant
            markdown += f"| {quadrant} | {cell['count']} | {cell['js_mean']:.4f} | {rho_text} |\n"
        if "flips_between_lambda_extremes" in diag:
            flips = diag["flips_between_lambda_extremes"]
            markdown += f"\nSamples whose prediction differs between the models at λ_min and λ_max: {flips}\n"
    markdown += deferral_markdown(results.get("deferral", {}))
    markdown += guarantee_markdown(results)
    markdown += mix_markdown(results)
    markdown += adaptation_markdown(results.get("adaptation", {}))
    write_atomic(json_path, json.dumps(results, indent=2, default=_encode) + "\n")
    write_atomic(md_path, markdown)
    return json_path, md_path


def coefficients_markdown(coefficients: dict[str, dict], samples: dict[str, int]) -> str:
    """λ per split (the run's setting, then model.grid's); with several experts, each expert's λ_k, JS with the
    generalist and mean T³ weight w_k (T³ with several experts: our extension)."""
    several = any("experts" in stats for stats in coefficients.values())
    if several:
        markdown = "\n## λ per split and expert (T³ with several experts, our extension)\n\n"
        markdown += "| split | expert | setting | samples | λ min | λ mean | λ max | JS mean | T³ weight mean |\n"
        markdown += "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    else:
        markdown = "\n## λ per split\n\n| split | setting | samples | λ min | λ mean | λ max | JS mean |\n"
        markdown += "|---|---|---:|---:|---:|---:|---:|\n"
    for split, stats in coefficients.items():
        for expert, own in stats["experts"].items() if several else [(None, stats)]:
            for setting, lam in {"run": own, **own.get("grid", {})}.items():  # the run's own, then model.grid's
                cells = [split, *([expert] if several else []), setting, str(samples[split])]
                cells += [f"{lam[key]:.4f}" for key in ("lambda_min", "lambda_mean", "lambda_max")]
                cells.append(f"{own['js_mean']:.4f}")
                if several:
                    weight = own.get("weight_mean") if setting == "run" else None
                    cells.append("–" if weight is None else f"{weight:.4f}")
                markdown += "| " + " | ".join(cells) + " |\n"
    if several:
        means = ", ".join(f"{split} {stats['generalised_js_mean']:.4f}" for split, stats in coefficients.items())
        markdown += f"\nMean generalised JS of the generalist and every expert (H(mean p) − mean H(p)): {means}\n"
    return markdown


def normalised_accuracy(
    accuracy: dict[str, dict[str, float]],
    domain_experts: dict[str, str],
    sources: dict[str, dict[str, dict]],
    experts: list[str],
) -> dict[str, dict[str, float]]:
    """Each method's accuracy over that of the split's domain expert alone (FusionBench's normalised accuracy), for
    the splits whose domain ``domain_experts`` names; in a mix, over the accuracy of every sample taken by its own
    source split's domain expert (an oracle router), where every source has one. Needs the experts' own columns."""

    def column(expert: str) -> str:
        return "expert" if experts == ["expert"] else f"expert:{expert}"

    table = {}
    for split, by_method in accuracy.items():
        if split in domain_experts:
            reference = by_method.get(column(domain_experts[split]))
        elif split in sources and all(source in domain_experts for source in sources[split]):
            parts = [
                (own["num_samples"], own["accuracy"].get(column(domain_experts[s])))
                for s, own in sources[split].items()
            ]
            known = all(value is not None for _, value in parts)
            reference = math.fsum(n * value for n, value in parts) / sum(n for n, _ in parts) if known else None
        else:
            continue
        if reference:  # undefined where the expert's column was not evaluated, or scored nothing
            table[split] = {method: value / reference for method, value in by_method.items()}
    return table


def guarantee_markdown(results: dict[str, Any]) -> str:
    """Per split, each method's calibrated rule as it fared there: the coverage its threshold reached and the selective
    risk it realised (by its top probability, and by −JS where it merges), whether that is at most α; and the
    conformal sets' coverage and mean size."""
    calibration = results.get("calibration")
    if not calibration:
        return ""
    alpha, delta = calibration["alpha"], calibration["delta"]
    text = (
        f"\n## Deferral with a guarantee\n\nCalibrated on {calibration['samples']} samples ({calibration['data']}): "
        f"each rule promises a selective risk ≤ {alpha:g} with probability ≥ {1 - delta:g} on data exchangeable with "
        f"them (Learn then Test), and sets holding the true class with probability ≥ {1 - alpha:g} (split conformal).\n"
    )
    for split, methods in results.get("guarantee", {}).items():
        if not methods:
            continue
        text += f"\n### {split}\n\n| method | coverage | risk | held | coverage (JS) | risk (JS) | held (JS) "
        text += "| LAC coverage, size | APS coverage, size | RAPS coverage, size |\n|---|" + "---:|" * 9 + "\n"
        for method, record in methods.items():
            cells = []
            for score in ("confidence", "js"):
                rule = record["selective"].get(score)
                cells += ["–"] * 3 if rule is None else _rule_cells(rule)
            sets = [f"{100 * s['coverage']:.1f} %, {s['set_size']:.2f}" for s in record["sets"].values()]
            text += f"| {method} | " + " | ".join(cells + sets) + " |\n"
    return text


def _rule_cells(rule: dict) -> list[str]:
    risk = "–" if rule["risk"] is None else f"{100 * rule['risk']:.2f} %"
    return [f"{100 * rule['coverage']:.1f} %", risk, "yes" if rule["held"] else "**no**"]


def deferral_markdown(deferral: dict[str, dict[str, dict]]) -> str:
    """Per split, each method's AURC and accuracy at 80/90/95 % coverage when the samples least trusted by its own top
    probability, or by JS, are handed to a person."""
    text = ""
    for split, methods in deferral.items():
        text += f"\n## Deferral: {split}\n\nSamples ranked by the method's top probability | by JS (the models agree "
        text += "first); AURC (lower is better), and top-1 (%) of the samples kept at 80, 90, 95 % coverage.\n\n"
        text += "| method | AURC | AURC (JS) | top-1 at 80 / 90 / 95 % | top-1 at 80 / 90 / 95 % (JS) |\n"
        text += "|---|---:|---:|---:|---:|\n"
        for method, scores in methods.items():
            kept = {s: " / ".join(f"{100 * v:.2f}" for v in scores[s]["accuracy_at"].values()) for s in scores}
            text += f"| {method} | {scores['confidence']['aurc']:.4f} | {scores['js']['aurc']:.4f} "
            text += f"| {kept['confidence']} | {kept['js']} |\n"
    return text


def mix_markdown(results: dict[str, Any]) -> str:
    """Per mixed split, each method's top-1 on each source split's images alone (that split's own column, where the
    run evaluated it) and inside the mix, side by side."""
    text = ""
    for mix, sources in results.get("sources", {}).items():
        header = " | ".join(f"{source} alone | {source} in {mix}" for source in sources)
        text += f"\n## Mixed split {mix}: each source alone and in the mix (top-1 %)\n\n| method | {header} |\n"
        text += "|---|" + "---:|" * (2 * len(sources)) + "\n"
        for method in results["accuracy"][mix]:
            cells = []
            for source, record in sources.items():
                alone = results["accuracy"].get(source, {}).get(method)
                cells += ["–" if alone is None else f"{100 * alone:.2f}", f"{100 * record['accuracy'][method]:.2f}"]
            text += f"| {method} | " + " | ".join(cells) + " |\n"
    return text


def adaptation_markdown(adaptation: dict[str, dict[str, dict]]) -> str:
    """AdaMerging's learnt coefficients per split (and expert, with several: ``learnt["experts"]``): the one λ, or the
    tensors' λ range and mean; the entropy at the first and last step."""
    rows = [(split, method, learnt) for split, methods in adaptation.items() for method, learnt in methods.items()]
    if not rows:
        return ""
    text = "\n## AdaMerging\n\n| split | method | λ (min / mean / max over tensors) | entropy, first → last step |\n"
    text += "|---|---|---|---|\n"
    for split, method, learnt in rows:
        coefficients = learnt["coefficients"]
        per_expert = coefficients.items() if "experts" in learnt else [(None, coefficients)]
        entropy = learnt["entropy"]
        for expert, values in per_expert:
            values = list(values.values()) if isinstance(values, dict) else [values]
            spread = f"{min(values):.4f} / {math.fsum(values) / len(values):.4f} / {max(values):.4f}"
            lam = f"{values[0]:.4f}" if len(values) == 1 else spread
            named = method if expert is None else f"{method}, expert {expert}"
            text += f"| {split} | {named} | {lam} | {entropy[0]:.4f} → {entropy[-1]:.4f} |\n"
    return text


def corruption_errors(accuracy: dict[str, dict[str, float]], reference: str) -> dict[str, dict[str, float]]:
    """ImageNet-C style: CE_c = Σ_s E(method, c, s) / Σ_s E(reference, c, s) with E = 1 − top-1; mCE = mean_c CE_c.

    Corrupted splits are those named ``{corruption}@{severity}``. Returns {method: {corruption: CE, "mCE": …}};
    a CE whose reference makes no errors is NaN.
    """
    by_corruption: dict[str, list[str]] = {}
    for split in accuracy:
        parsed = parse_corrupted(split)
        if parsed is not None:
            by_corruption.setdefault(parsed[0], []).append(split)
    table: dict[str, dict[str, float]] = {}
    for method in next(iter(accuracy.values()), {}):
        row = {}
        for corruption, splits in by_corruption.items():
            reference_error = sum(1 - accuracy[s][reference] for s in splits)
            error = sum(1 - accuracy[s][method] for s in splits)
            row[corruption] = error / reference_error if reference_error > 0 else math.nan
        if row:
            row["mCE"] = sum(row.values()) / len(row)
            table[method] = row
    return table


def summary_rows(
    accuracy: dict[str, dict[str, float]],
    errors: dict[str, dict[str, float]],
    partial: dict | None = None,
    missing: list[str] | None = None,
    deferral: dict[str, dict[str, dict]] | None = None,
    normalised: dict[str, dict[str, float]] | None = None,
    mixes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The paper's layout: one row per method; in-domain, base-to-novel (and other plain splits), the mean
    top-1 over the corrupted splits, and mCE. A column from fewer samples than its splits hold says so in its
    name (``a (partial 64/498)``, ``corrupted_mean (partial)``), and a mean over fewer corrupted splits than the run
    has (``missing``: an interrupted run's) says how many (``corrupted_mean (5 of 10 splits)``), so that no summary
    file passes for complete. With ``deferral``, the mean AURC over the splits, by the method's top probability
    (``AURC``) and by JS (``AURC (JS)``). With ``normalised`` (a run of several experts: ``normalised_accuracy``, empty
    without ``data.expert_of``) FusionBench's layout instead: every split a column, their unweighted ``mean``, and the
    mean normalised accuracy over the splits that have one; both means leave out the ``mixes``, whose samples their
    source splits already count."""
    partial = partial or {}
    several = normalised is not None
    corrupted = [s for s in accuracy if is_corrupted(s) and not several]
    plain = [s for s in accuracy if s not in corrupted]  # in_domain, base_to_novel and any split of the user's
    columns = {
        s: f"{s} (partial {partial[s]['evaluated']}/{partial[s]['total']})" if s in partial else s for s in plain
    }
    not_done = [s for s in missing or () if is_corrupted(s)]
    suffix = "".join(
        [
            f" ({len(corrupted)} of {len(corrupted) + len(not_done)} splits)" if not_done else "",
            " (partial)" if set(corrupted) & set(partial) else "",
        ]
    )
    rows = []
    for method in next(iter(accuracy.values()), {}):
        row: dict[str, Any] = {"method": method}
        for split in plain:
            row[columns[split]] = accuracy[split][method]
        if corrupted:
            row["corrupted_mean" + suffix] = sum(accuracy[s][method] for s in corrupted) / len(corrupted)
            row["mCE" + suffix] = errors.get(method, {}).get("mCE", math.nan)
        if several:
            averaged = [s for s in plain if s not in (mixes or ())]
            done = f" ({len(averaged)} of {len(averaged) + len(missing or ())} splits)" if missing else ""
            row["mean" + done] = math.fsum(accuracy[s][method] for s in averaged) / len(averaged)
            if normalised:
                values = [by_method[method] for split, by_method in normalised.items() if split not in (mixes or ())]
                if values:
                    row[f"normalised mean ({len(values)} splits)"] = math.fsum(values) / len(values)
        for score, column in (("confidence", "AURC"), ("js", "AURC (JS)")):
            values = [methods[method][score]["aurc"] for methods in (deferral or {}).values() if method in methods]
            if values:
                row[column] = math.fsum(values) / len(values)
        rows.append(row)
    return rows


def write_summary(
    results_dir: str | Path, rows: list[dict[str, Any]], missing: list[str] | None = None, note: str | None = None
) -> list[Path]:
    """summary.md, summary.csv and summary.json (accuracies in percent in the Markdown table); summary.md names the
    splits an interrupted run still lacks under its table, then ``note``."""
    results_dir = Path(results_dir)
    columns = list(rows[0]) if rows else ["method"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [row["method"]] + [summary_cell(c, row.get(c, math.nan)) for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    paths = [results_dir / "summary.md", results_dir / "summary.csv", results_dir / "summary.json"]
    if missing:
        lines += ["", f"Missing splits (not evaluated yet, left out of every mean): {', '.join(missing)}"]
    if note:
        lines += ["", note]
    write_atomic(paths[0], "\n".join(lines) + "\n")
    write_atomic(paths[1], buffer.getvalue())
    write_atomic(paths[2], json.dumps(rows, indent=2) + "\n")
    return paths


def guarantee_columns(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` with each method's calibrated rule (by its top probability) as it fared in-domain (the ``in_domain``
    split, else the first) and under shift (the mean over the other splits, mixes left out): the coverage reached
    and the selective risk realised."""
    records = {split: methods for split, methods in results.get("guarantee", {}).items() if methods}
    if not records:
        return rows
    mixes = set(results.get("sources", {}))
    home = "in_domain" if "in_domain" in records else next(iter(records))
    shifted = [split for split in records if split != home and split not in mixes]
    for row in rows:
        rules = {split: records[split][row["method"]]["selective"]["confidence"] for split in records}
        row["guaranteed coverage (in-domain)"] = rules[home]["coverage"]
        row["guaranteed risk (in-domain)"] = rules[home]["risk"]
        if shifted:
            risks = [rules[s]["risk"] for s in shifted if rules[s]["risk"] is not None]
            row["guaranteed coverage (shift)"] = math.fsum(rules[s]["coverage"] for s in shifted) / len(shifted)
            row["guaranteed risk (shift)"] = math.fsum(risks) / len(risks) if risks else None
    return rows


def summary_cell(column: str, value: float) -> str:
    """A summary value as shown to people: accuracies in percent, mCE as a ratio, n/a where undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if column == "ms/img":
        return f"{value:.2f}"
    if column.startswith("AURC"):
        return f"{value:.4f}"
    return f"{value:.3f}" if column.startswith("mCE") else f"{100 * value:.2f}"
