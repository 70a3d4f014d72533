"""``vad bench``: sweep detectors x ensembles x backbones x categories from a YAML grid.

Grid file (every key but the four axes is a :class:`vad.config.RunConfig` field shared by all
cells, e.g. ``dataset``, ``root``, ``threshold``, ``options``, ``device``)::

    dataset: demo
    categories: [brick, grass]          # default: every category of the data set
    detectors: [patchcore, simplenet]   # "a+b" (or a list) = several detectors in one cell
    ensembles: [null, score-mean]       # null = no ensemble
    backbones: [tf_efficientnet_lite0, [tf_efficientnet_lite0, tf_efficientnet_lite2]]
    train_counts: [1, 2, 4, 8, all]     # optional: the few-shot protocol (RunConfig.train_count)
    # or, instead of the three method axes, several method grids in one file:
    # groups: [{detectors: [patchcore], backbones: [lite0, lite2]}, {detectors: [patchcore], ensembles: [score-mean], backbones: [[lite0, lite2]]}]
    threshold: k-sigma
    report: false                       # the default in a sweep: no plots per cell

Each cell is one :func:`vad.pipeline.run` writing ``<output>/cells/<cell id>/``. A cell whose
``metrics.json`` exists is finished and is not rerun (delete its folder to redo it); a cell that
fails writes ``error.txt`` and the sweep goes on, so rerunning the command retries only the
failed and missing cells. At the end ``bench.md``, ``bench.csv`` and ``bench.json`` hold one row
per cell: accuracy metrics, fit time (s) and prediction time (ms per image), or the error.
A grid holding ensembles and their members alone also writes ``bench_members.md`` and
``bench_members.png`` (each ensemble against its best member, paired bootstrap intervals, as a
table and a forest plot: :mod:`vad.comparison`; per anomaly kind too where the data set labels
kinds). ``report.html`` shows the table, that comparison and the plots on one page. A grid
over ``train_counts`` also draws ``bench_train_count.png``: the mean image AUROC over
the categories against the number of training images, one line per detector, ensemble and
backbone (a K below 2 usually needs ``threshold: manual``, as calibration needs unseen normals).
"""

from __future__ import annotations

import html
import itertools
import json
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vad import artifacts, runfolder
from vad.config import DEFAULTS
from vad.errors import VadError
from vad.results import csv_table, markdown_table

AXES = ("detectors", "ensembles", "backbones", "categories", "train_counts")
TIMINGS = ["fit_s", "predict_ms_per_image"]


@dataclass
class Cell:
    """One point of the grid."""

    detectors: list[str]
    ensemble: str | None
    backbones: list[str]
    category: str | None
    #: The few-shot protocol's number of training images (None: all, or the grid's shared setting).
    train_count: int | None = None

    @property
    def group(self) -> str:
        """The method this cell measures: detectors, ensemble and backbones."""
        return " / ".join(["+".join(self.detectors), self.ensemble or "none", "+".join(self.backbones) or "default"])

    @property
    def id(self) -> str:
        """Folder name: readable and unique within the grid."""
        parts = ["+".join(self.detectors), self.ensemble or "none", "+".join(self.backbones) or "default", self.category or "all"]
        if self.train_count is not None:
            parts.append(f"k{self.train_count}")
        return "__".join(re.sub(r"[^A-Za-z0-9._+-]+", "-", part) for part in parts)


@dataclass
class CellResult:
    """A finished, cached or failed cell."""

    cell: Cell
    status: str  # "done", "cached" or "failed"
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


METHOD_AXES = ("detectors", "ensembles", "backbones")


def _singular_axes(data: dict[str, Any]) -> dict[str, Any]:
    """Singular spellings of the axes accepted (``detector: patchcore``)."""
    for singular, plural in (("detector", "detectors"), ("ensemble", "ensembles"), ("backbone", "backbones"), ("category", "categories")):
        if singular in data and plural not in data:
            data[plural] = data.pop(singular)
    return data


def _methods(data: dict[str, Any], path: str | Path, where: str) -> list[tuple[list[str], str | None, list[str]]]:
    """The (detectors, ensemble, backbones) combinations of one grid or group (popped from ``data``)."""
    detectors = [d if isinstance(d, list) else str(d).split("+") for d in _as_list(data.pop("detectors", None))]
    if not detectors:
        raise VadError(f"grid file {path}{where} names no detector: add e.g. 'detectors: [{DEFAULTS['detector']}]'")
    ensembles = _as_list(data.pop("ensembles", None)) or [None]
    backbones = [b if isinstance(b, list) else [str(b)] for b in _as_list(data.pop("backbones", None))] or [[]]
    return [
        ([str(d) for d in detector], None if ensemble in (None, "none") else str(ensemble), [str(b) for b in backbone])
        for detector, ensemble, backbone in itertools.product(detectors, ensembles, backbones)
    ]


def load_grid(path: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """The shared RunConfig fields and the cells of a grid file.

    ``groups`` (instead of top-level detectors / ensembles / backbones) lists several method
    grids in one file, each crossed on its own and all with the shared categories, e.g. the
    members alone and their fusions: ``groups: [{backbones: [lite0, lite2]}, {ensembles:
    [pca-global], backbones: [[lite0, lite2]]}]`` with ``detectors`` given per group."""
    from vad.config import FIELDS, read_yaml_mapping

    data = _singular_axes(read_yaml_mapping(path, "grid file", "detectors, ensembles, backbones, categories, ..."))
    unknown = sorted(set(data) - FIELDS - set(AXES) - {"groups"})
    if unknown:
        raise VadError(f"grid file {path} has unknown keys {unknown}; axes are {list(AXES)} (or groups), other keys are run options ({', '.join(sorted(FIELDS))})")
    if "groups" in data:
        groups = data.pop("groups")
        if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
            raise VadError(f"grid file {path}: groups must be a non-empty list of mappings of {', '.join(METHOD_AXES)}")
        if any(axis in data for axis in METHOD_AXES):
            raise VadError(f"grid file {path}: with groups, give {', '.join(METHOD_AXES)} inside each group, not at the top")
        methods = []
        for index, group in enumerate(groups):
            group = _singular_axes(dict(group))
            extra = sorted(set(group) - set(METHOD_AXES))
            if extra:
                raise VadError(f"grid file {path}: group {index + 1} has keys {extra}; a group holds only {', '.join(METHOD_AXES)}")
            methods += _methods(group, path, f" (group {index + 1})")
    else:
        methods = _methods(data, path, "")
    categories = [str(c) for c in _as_list(data.pop("categories", None))]
    train_counts = _train_counts(data.pop("train_counts", None), path)
    if train_counts != [None] and data.get("train_count") is not None:
        raise VadError(f"grid file {path} sets both train_count and train_counts; keep the axis (train_counts) only")
    base = {"report": False, **data}
    if not categories:
        categories = _dataset_categories(base)
    cells = [
        Cell(detectors, ensemble, backbones, category, count)
        for (detectors, ensemble, backbones), category, count in itertools.product(methods, categories, train_counts)
    ]
    return base, cells


def _train_counts(values: Any, path: str | Path) -> list[int | None]:
    """The ``train_counts`` axis: whole numbers of at least 1, and ``all`` (or null) for every image."""
    counts: list[int | None] = []
    for value in _as_list(values):
        if value is None or value == "all":
            counts.append(None)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            counts.append(value)
        else:
            raise VadError(f"grid file {path}: train_counts takes whole numbers of at least 1 and 'all', got {value!r}")
    return counts or [None]


def _dataset_categories(base: dict[str, Any]) -> list[str]:
    from vad.build import create_dataset
    from vad.config import RunConfig
    from vad.plugins import get_registry

    registry = get_registry()
    config = RunConfig(**{k: v for k, v in base.items() if k != "categories"})
    return create_dataset(config, registry).categories()


def cell_config(base: dict[str, Any], cell: Cell, folder: Path, registry: Any = None) -> Any:
    """The RunConfig of one cell, with the grid's options for the components this cell uses
    (a grid sets options for every detector it sweeps; each cell takes its own)."""
    from vad.build import used_components, uses_group
    from vad.config import RunConfig
    from vad.plugins import get_registry

    registry = registry or get_registry()
    cell_fields = {"detectors": cell.detectors, "ensemble": cell.ensemble, "backbones": cell.backbones, "categories": [cell.category] if cell.category else [], "output": str(folder)}
    if cell.train_count is not None:
        cell_fields["train_count"] = cell.train_count
    config = RunConfig(**{**base, **cell_fields})
    used = used_components(config, registry)
    config.options = {group: values for group, values in config.options.items() if uses_group(group, used, registry)}
    config.category_options = {
        category: {group: values for group, values in groups.items() if uses_group(group, used, registry)}
        for category, groups in config.category_options.items() if cell.category in (None, category)
    }
    return config


def check_cells(base: dict[str, Any], cells: list[Cell], output: Path, registry: Any = None) -> None:
    """Every cell's names and the grid's options, checked before the first cell runs: a typo
    in the grid fails the sweep at once, not after hours of cells."""
    from vad.build import check_names, check_options
    from vad.config import RunConfig
    from vad.plugins import get_registry

    registry = registry or get_registry()
    problems = []
    for cell in cells:
        try:
            config = cell_config(base, cell, output / "cells" / cell.id, registry)
            check_names(config, registry)
        except VadError as error:
            problems.append(f"{cell.id}: {error}")
    try:
        grid = RunConfig(**base)
    except VadError as error:
        problems.append(f"options: {error}")
    else:
        for what, config in [("options", grid), *((f"category_options of {c!r}", grid.for_category(c)) for c in grid.category_options)]:
            try:
                check_options(config, registry, used_only=False)
            except VadError as error:
                problems.append(f"{what}: {error}")
    if problems:
        raise VadError("the grid names what is not installed or allowed; nothing was run:\n  " + "\n  ".join(dict.fromkeys(problems)))


def _flatten(metrics_json: dict[str, Any]) -> dict[str, Any]:
    row = dict(metrics_json.get("mean") or {})
    timings = metrics_json.get("timings") or {}
    for key in TIMINGS:
        values = [t[key] for t in timings.values() if isinstance(t.get(key), (int, float))]
        if values:
            row[key] = sum(values) / len(values)
    counts = list((metrics_json.get("train_images") or {}).values())
    if counts:
        row["train_images"] = sum(counts) / len(counts)
    return row


def run_cell(base: dict[str, Any], cell: Cell, folder: Path, registry: Any = None) -> CellResult:
    """Run (or reuse) one cell; errors become a failed result, never an exception."""
    from vad.pipeline import run

    metrics_file = folder / "metrics.json"
    if runfolder.is_complete(folder):
        try:
            return CellResult(cell, "cached", _flatten(json.loads(metrics_file.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: run the cell again
    (folder / "error.txt").unlink(missing_ok=True)  # the last attempt's; this one writes its own
    try:
        config = cell_config(base, cell, folder, registry)
        run(config, registry, overwrite=True)  # an unfinished or failed attempt is redone
        return CellResult(cell, "done", _flatten(json.loads(metrics_file.read_text(encoding="utf-8"))))
    except KeyboardInterrupt:
        raise
    except Exception as error:  # one broken cell must not stop the sweep
        message = f"{type(error).__name__}: {error}" if not isinstance(error, VadError) else str(error)
        artifacts.atomic_write_text(folder / "error.txt", message + "\n\n" + traceback.format_exc())
        return CellResult(cell, "failed", error=message.splitlines()[0] if message else type(error).__name__)


def _columns(results: list[CellResult]) -> list[str]:
    present: list[str] = []
    for r in results:
        present.extend(k for k in r.metrics if k not in present)
    metrics = [c for c in DEFAULTS['table_metrics'] if c in present] + sorted(c for c in present if c not in DEFAULTS['table_metrics'] and c not in TIMINGS and c != "train_images")
    return metrics + [c for c in ["train_images", *TIMINGS] if c in present]


def _resolved_backbones(cell: Cell) -> list[str]:
    """The backbones a cell really uses (the defaults when the grid names none; as given when
    its ensembler is not installed)."""
    from vad.build import backbone_specs
    from vad.config import RunConfig
    from vad.plugins import get_registry

    try:
        return backbone_specs(RunConfig(ensemble=cell.ensemble, backbones=cell.backbones), get_registry())
    except VadError:
        return cell.backbones


def table_rows(results: list[CellResult]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per cell."""
    swept = any(r.cell.train_count is not None for r in results)
    columns = ["cell", "detector", "ensemble", "backbone", "category", *(["train_count"] if swept else []), "status", *_columns(results), "error"]
    rows = []
    for r in results:
        row = {
            "cell": r.cell.id,
            "detector": "+".join(r.cell.detectors),
            "ensemble": r.cell.ensemble or "none",
            "backbone": "+".join(_resolved_backbones(r.cell)),
            "category": r.cell.category or "all",
            "train_count": "all" if r.cell.train_count is None else r.cell.train_count,
            "status": r.status,
            "error": r.error or "",
            **r.metrics,
        }
        rows.append({c: row.get(c) for c in columns})
    return columns, rows


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """Markdown table; numbers to 4 decimals, missing values ``n/a``; the cell id is left out."""
    shown = [c for c in columns if c != "cell"]
    return markdown_table(shown, ([row.get(c) for c in shown] for row in rows))


def to_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """CSV with full precision; missing values empty."""
    return csv_table(columns, ([row.get(c) for c in columns] for row in rows))


def write_table(output: Path, results: list[CellResult]) -> None:
    """``bench.md``, ``bench.csv`` and ``bench.json`` of the cells finished so far (atomically)."""
    columns, rows = table_rows(results)
    artifacts.atomic_write_text(output / "bench.md", to_markdown(columns, rows))
    artifacts.atomic_write_text(output / "bench.csv", to_csv(columns, rows))
    artifacts.atomic_write_json(output / "bench.json", {"columns": columns, "rows": rows})


def write_summary(output: Path, results: list[CellResult], train_counts: bool) -> None:
    """After the sweep: ``bench_members.md`` / ``.json`` / ``.png`` (each ensemble against its
    best member, when the grid has both: :mod:`vad.comparison`), ``bench_train_count.png`` for a
    grid over ``train_counts``, and ``report.html`` with the table, the comparison and the plots."""
    from vad.comparison import COLUMNS, NOTE, against_members, markdown, plot_png, table
    from vad.report import render_tables_html

    columns, rows = table_rows(results)
    records = against_members(rows, lambda row: output / "cells" / row["cell"])
    plots = []
    if records:
        artifacts.atomic_write_text(output / "bench_members.md", markdown(records))
        artifacts.atomic_write_json(output / "bench_members.json", {"records": records})
        artifacts.atomic_write_bytes(output / "bench_members.png", plot_png(records))
        plots.append(("bench_members.png", "Each ensemble minus its best member (rows as numbered above)"))
    plot = train_count_plot(results) if train_counts else None
    if plot is not None:
        artifacts.atomic_write_bytes(output / "bench_train_count.png", plot)
        plots.append(("bench_train_count.png", "Mean image AUROC by number of training images"))
    shown = [c for c in columns if c != "cell"]
    sections = [("Cells", "", shown, ([row.get(c) for c in shown] for row in rows))]
    if records:
        sections.append((
            "Does the ensemble beat its best member?",
            html.escape(NOTE) + "; a verdict only when the interval excludes 0; where the data set labels anomaly kinds (structural / logical), "
            "each kind is compared on the good images and that kind's anomalies",
            COLUMNS, table(records),
        ))
    page = render_tables_html(f"vad bench report: {output.name}", 'the table as <a href="bench.csv">bench.csv</a> and <a href="bench.json">bench.json</a>; '
                              "each cell's run folder under <code>cells/</code>", sections, plots)
    artifacts.atomic_write_text(output / "report.html", page)


def run_bench(
    grid: str | Path, output: str | Path, registry: Any = None, engine: str = "local", address: str | None = None, num_cpus: int | None = None
) -> tuple[Path, list[CellResult]]:
    """Run every cell of ``grid`` under ``output`` (one after another, or as Ray tasks with
    ``engine="ray"``, :mod:`vad.distributed`); the table is rewritten after each finished cell."""
    from vad.distributed import ENGINES
    from vad.progress import info, warn

    if engine not in ENGINES:
        raise VadError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "local" and address is not None:
        raise VadError("--address names a Ray cluster: use it with --engine ray")
    base, cells = load_grid(grid)
    output = Path(output)
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise VadError("the grid has duplicate cells; list each detector, ensemble, backbone and category once")
    check_cells(base, cells, output, registry)
    output.mkdir(parents=True, exist_ok=True)
    finished: list[CellResult] = []

    def heard(result: CellResult) -> None:
        if result.status == "failed":
            warn(f"cell {result.cell.id} failed: {result.error}")
        elif result.status == "cached":
            info(f"[bench] {result.cell.id}: finished earlier, not rerun")
        finished.append(result)
        write_table(output, sorted(finished, key=lambda r: ids.index(r.cell.id)))

    if engine == "ray":
        from vad.distributed import run_cells_ray

        info(f"[bench] {len(cells)} cells as Ray tasks")
        results = run_cells_ray(base, cells, output, heard, address, num_cpus)
    else:
        results = []
        for number, cell in enumerate(cells, 1):
            info(f"[bench {number}/{len(cells)}] {cell.id}")
            result = run_cell(base, cell, output / "cells" / cell.id, registry)
            heard(result)
            results.append(result)
    write_table(output, results)
    write_summary(output, results, train_counts=len({cell.train_count for cell in cells}) > 1)
    return output, results


def train_count_curves(results: list[CellResult], metric: str = "image_auroc") -> list[Any]:
    """Per method (detectors, ensemble, backbones): ``metric`` averaged over the categories
    against the number of images that trained it (``train_images``), one point per count."""
    from vad.contracts import Curve

    points: dict[str, dict[int | None, list[tuple[float, float]]]] = {}
    for r in results:
        if r.status != "failed" and isinstance(r.metrics.get(metric), (int, float)) and isinstance(r.metrics.get("train_images"), (int, float)):
            points.setdefault(r.cell.group, {}).setdefault(r.cell.train_count, []).append((r.metrics["train_images"], r.metrics[metric]))
    curves = []
    for group, by_count in points.items():
        xy = sorted((sum(x for x, _ in pairs) / len(pairs), sum(y for _, y in pairs) / len(pairs)) for pairs in by_count.values())
        curves.append(Curve(metric, np.array([x for x, _ in xy]), np.array([y for _, y in xy]), "normal training images", f"mean {metric}", group))
    return curves


def train_count_plot(results: list[CellResult], metric: str = "image_auroc") -> bytes | None:
    """The PNG of :func:`train_count_curves`; None when no cell has the metric."""
    from vad.report import curves_png

    curves = train_count_curves(results, metric)
    return curves_png(curves, f"{metric} by number of training images") if curves else None
