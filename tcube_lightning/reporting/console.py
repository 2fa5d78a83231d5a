"""The end-of-run table on the console (rich): the summary's rows, as in summary.md."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tcube_lightning.reporting.results import summary_cell


def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Rows of ``results.summary_rows``: one per method; accuracies in percent, mCE as a ratio."""
    table = Table(title=title, title_justify="left")
    columns = list(rows[0]) if rows else ["method"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        # Text, not a markup string: grid columns are named like "t3[gamma=8]", which rich would read as a style.
        table.add_row(Text(row["method"]), *(summary_cell(column, row.get(column)) for column in columns[1:]))
    return table


def print_summary(rows: list[dict[str, Any]], title: str) -> None:
    """Print the table on stdout; wide enough for every column, also when stdout is not a terminal."""
    table = summary_table(rows, title)
    console = Console()
    unbounded = console.options.update(max_width=10_000)  # measured as wide as it wants, not the terminal's width
    console.width = max(console.width, console.measure(table, options=unbounded).maximum)
    console.print(table)
