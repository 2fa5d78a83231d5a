"""Split names: corrupted splits are named ``{corruption}@{severity}``; this module alone forms and reads them."""

from __future__ import annotations

SEPARATOR = "@"


def corrupted_split_name(corruption: str, severity: int) -> str:
    return f"{corruption}{SEPARATOR}{severity}"


def parse_corrupted(split: str) -> tuple[str, int] | None:
    """(corruption, severity) of a corrupted split's name; None for any other split."""
    corruption, separator, severity = split.rpartition(SEPARATOR)
    if not (separator and corruption and severity.isdigit()):
        return None
    return corruption, int(severity)


def is_corrupted(split: str) -> bool:
    return parse_corrupted(split) is not None
