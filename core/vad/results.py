"""The per-run results table: one row per category plus the mean, computed by code."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
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
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(columns: list[str], rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| category | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for category, row in rows.items():
        label = f"**{category}**" if category == MEAN_ROW else category
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: Mapping[str, Mapping[str, Any]]) -> str:
    """CSV with full precision; missing values are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *columns])
    for category, row in rows.items():
        writer.writerow([category, *("" if row.get(c) is None else row.get(c) for c in columns)])
    return buffer.getvalue()


def write_results_table(folder: str | Path, per_category: Mapping[str, Mapping[str, float | None]]) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``results.json`` (with the mean row)."""
    folder = Path(folder)
    columns, rows = table_with_mean(per_category)
    paths = {"csv": folder / "results.csv", "md": folder / "results.md", "json": folder / "results.json"}
    atomic_write_text(paths["csv"], to_csv(columns, rows))
    atomic_write_text(paths["md"], to_markdown(columns, rows))
    atomic_write_json(paths["json"], {"columns": columns, "rows": rows})
    return paths
