"""The per-run results table: one row per category plus the mean, computed by code."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vad.artifacts import atomic_write_json, atomic_write_text

MEAN_ROW = "mean"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def table_with_mean(per_category: Mapping[str, Mapping[str, float | None]]) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """Columns and rows with a ``mean`` row; a column's mean covers the categories that have it."""
    columns: list[str] = []
    for values in per_category.values():
        for name in values:
            if name not in columns:
                columns.append(name)
    rows = {category: {c: values.get(c) for c in columns} for category, values in per_category.items()}
    if len(rows) > 0:
        mean_row: dict[str, float | None] = {}
        for column in columns:
            present = [row[column] for row in rows.values() if _finite(row[column])]
            mean_row[column] = sum(present) / len(present) if present else None
        rows[MEAN_ROW] = mean_row
    return columns, rows


def _fmt(value: Any, digits: int = 4) -> str:
    """A Markdown cell: ``n/a`` for missing, floats to ``digits`` decimals, text kept on one line."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], right_aligned_from: int | None = None) -> str:
    """A GitHub Markdown table; columns from ``right_aligned_from`` on are right-aligned."""
    first = len(header) if right_aligned_from is None else right_aligned_from
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * first + "---:|" * (len(header) - first)]
    lines += ["| " + " | ".join(_fmt(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV with full precision; missing values are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if value is None else value for value in row] for row in rows)
    return buffer.getvalue()


def to_markdown(columns: list[str], rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The results table in Markdown, the mean row in bold."""
    cells = ([f"**{category}**" if category == MEAN_ROW else category, *(row.get(c) for c in columns)] for category, row in rows.items())
    return markdown_table(["category", *columns], cells, right_aligned_from=1)


def to_csv(columns: list[str], rows: Mapping[str, Mapping[str, Any]]) -> str:
    """The results table as CSV."""
    return csv_table(["category", *columns], ([category, *(row.get(c) for c in columns)] for category, row in rows.items()))


def write_results_table(folder: str | Path, per_category: Mapping[str, Mapping[str, float | None]]) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.json`` (with the mean row)."""
    folder = Path(folder)
    columns, rows = table_with_mean(per_category)
    paths = {"csv": folder / "results.csv", "md": folder / "results.md", "json": folder / "results.json"}
    atomic_write_text(paths["csv"], to_csv(columns, rows))
    atomic_write_text(paths["md"], to_markdown(columns, rows))
    atomic_write_json(paths["json"], {"columns": columns, "rows": rows})
    return paths


def decision_rows(per_group: Mapping[str, Mapping[str, Mapping[str, Any]]], group: str = "category") -> tuple[list[str], list[list[Any]]]:
    """A decision table (:mod:`vad.decisions`) as one row per ``group`` (category or machine) and rule."""
    from vad.decisions import COLUMNS

    header = [group, "rule", *COLUMNS, "note"]
    rows = [[name, rule, *(values.get(c) for c in COLUMNS), values.get("note", "")] for name, rules in per_group.items() for rule, values in rules.items()]
    return header, rows


def write_decisions_table(
    folder: str | Path, per_group: Mapping[str, Mapping[str, Mapping[str, Any]]], group: str = "category", stem: str = "decisions"
) -> dict[str, Path] | None:
    """Write ``<stem>.csv`` and ``<stem>.md`` (nothing when no group has decisions)."""
    header, rows = decision_rows(per_group, group)
    if not rows:
        return None
    folder = Path(folder)
    paths = {"csv": folder / f"{stem}.csv", "md": folder / f"{stem}.md"}
    atomic_write_text(paths["csv"], csv_table(header, rows))
    atomic_write_text(paths["md"], markdown_table(header, rows, right_aligned_from=2))
    return paths
