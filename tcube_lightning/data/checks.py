"""Checks of what a split holds, before any model loads: labels that are class indices, class names the prompts can
tell apart, templates with one place for the class name; every problem found said at once."""

from __future__ import annotations

import collections
import math
import string

import numpy as np

from tcube_lightning.errors import InputError


def check_template(template: str) -> None:
    """A prompt template has exactly one ``{}``, where the class name goes (a literal brace is ``{{`` or ``}}``)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise InputError(
            f"data.templates: {template!r} is not a template ({err}); write a literal brace as {{{{ or }}}}"
        ) from err
    if fields != [""]:
        raise InputError(
            f"data.templates: {template!r} has {len(fields)} replacement field(s) {['{' + f + '}' for f in fields]}; "
            "each template needs exactly one {} for the class name"
        )


def raise_problems(problems: list[str]) -> None:
    """One error for every problem found (each file that cannot be read named at once), if any."""
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {problem}" for i, problem in enumerate(problems, 1))
        raise InputError(f"{len(problems)} problems with the data: {listed}")


def check_classnames(split: str, classnames: list[str]) -> None:
    """At least two classes, each named, and no two whose prompts read alike (the tokenizers ignore case and
    spacing): they would share one zero-shot embedding, and the second could never be predicted."""
    if len(classnames) < 2:
        raise InputError(
            f"split {split!r}: {len(classnames)} class ({classnames}); zero-shot classification needs two or more "
            "(an image folder names its classes by its subfolders)"
        )

    def as_read(name: str) -> str:
        return " ".join(name.lower().split())

    empty = [index for index, name in enumerate(classnames) if not name.strip()]
    if empty:
        raise InputError(f"split {split!r}: class name(s) at position {empty} are empty; every class needs a name")
    counts = collections.Counter(map(as_read, classnames))
    repeats = [name for name in classnames if counts[as_read(name)] > 1]
    if repeats:
        raise InputError(
            f"split {split!r}: class names must be distinct as the prompts read them (case and spacing ignored); "
            f"repeated: {repeats}"
        )


def check_labels(split: str, labels: object, classes: int) -> None:
    """Every label of ``split`` is a whole class index in 0..classes − 1 (none missing, none fractional)."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        missing = np.asarray([v is None or (isinstance(v, float) and math.isnan(v)) for v in labels.tolist()])
        if missing.any():
            raise InputError(
                f"split {split!r}: {int(missing.sum())} label(s) are missing (null or NaN; first at row "
                f"{int(np.flatnonzero(missing)[0])}); every sample needs a class index 0..{classes - 1}"
            )
        labels = labels.astype(np.float64)
        fractional = ~np.isfinite(labels) | (labels != np.round(labels))
        if fractional.any():
            raise InputError(
                f"split {split!r}: {int(fractional.sum())} label(s) are not whole class indices (first: "
                f"{labels[fractional][0]}); labels must be integers 0..{classes - 1}"
            )
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise InputError(
            f"split {split!r}: {int(bad.sum())} label(s) outside 0..{classes - 1} for "
            f"{classes} class names (first bad label: {int(labels[bad][0])})"
        )
