"""Human-readable outputs of a run (per-category files and the run summary)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vad.config import RunConfig
    from vad.contracts import EvaluationData
    from vad.model import AnomalyModel, Output


def write_category_report(folder: Path, data: EvaluationData, outputs: list[Output], model: AnomalyModel, config: RunConfig) -> None:
    """Per-category visual outputs (filled in by the report work; nothing yet)."""


def write_run_report(folder: Path, results: list[Any], config: RunConfig) -> None:
    """The run summary (filled in by the report work; nothing yet)."""
