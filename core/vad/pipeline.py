"""``vad run``: dataset -> preprocessing -> feature source / ensemble -> detector -> postprocess
-> threshold -> metrics -> run folder, for each chosen category.

The run folder holds ``config.yaml`` (resolved), ``metrics.json``, ``results.{csv,md,json}``
and per category ``<category>/model/`` (the fitted model folder) and ``<category>/scores.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vad import artifacts
from vad.config import RunConfig
from vad.build import backbone_specs, build_model, check_options, create_dataset
from vad.calibration import false_alarm_warning, false_alarms_on
from vad.contracts import DataSplits, Dataset, EvaluationData, Metric
from vad.errors import VadError
from vad.model import AnomalyModel, Output, resolve_device, seed_everything
from vad.plugins import Registry, get_registry
from vad.progress import info, warn
from vad.results import table_with_mean, write_results_table
from vad.training import session


@dataclass
class CategoryResult:
    """One category's metrics, the reasons metrics were skipped, and timings."""

    category: str
    metrics: dict[str, float | None]
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float | None] = field(default_factory=dict)
    #: How the thresholds were calibrated and the false-alarm rate they imply (vad.calibration).
    calibration: dict[str, Any] = field(default_factory=dict)


def compute_metrics(
    data: EvaluationData, config: RunConfig, registry: Registry, produces_maps: bool
) -> tuple[dict[str, float | None], dict[str, str], list[Metric]]:
    """Every registered (or chosen) metric that applies; the others with the reason they do not;
    and the metric objects that were computed (the report draws their curves)."""
    names = config.metrics or sorted(registry.entries("metrics"))
    values: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    computed: list[Metric] = []
    for name in names:
        cls = registry.load_class("metrics", name)
        if cls.level == "pixel" and not produces_maps:
            skipped[name] = "the detector gives image scores only: pixel metrics do not apply"
            continue
        if cls.level == "pixel" and (data.masks is None or all(mask is None for mask in data.masks)):
            skipped[name] = "the data set has no pixel ground truth"
            continue
        metric = cls(**config.options_for(name))
        reason = metric.applicable(data)
        if reason:
            skipped[name] = reason
            continue
        value = metric.compute(data)
        computed.append(metric)
        for key, number in (value.items() if isinstance(value, dict) else [(name, value)]):
            # NaN is not JSON and not a result: report it as missing
            values[key] = None if number is None or not np.isfinite(number) else float(number)
    return values, skipped, computed


def evaluation_data(outputs: list[Output], model: AnomalyModel) -> EvaluationData:
    """Collect outputs and ground truth (at original resolution) for the metrics."""
    maps = [o.map for o in outputs] if model.produces_maps else None
    masks = [o.sample.load_mask() for o in outputs] if model.produces_maps else None
    return EvaluationData(
        scores=np.array([o.score for o in outputs], dtype=np.float64),
        labels=np.array([o.sample.label for o in outputs], dtype=np.int64),
        maps=maps,
        masks=masks,
        samples=[o.sample for o in outputs],
        image_threshold=model.image_threshold,
        pixel_threshold=model.pixel_threshold,
    )


def scores_csv(outputs: list[Output]) -> str:
    """Per-image raw scores and decisions."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "category", "defect_type", "label", "score", "decision"])
    for o in outputs:
        decision = "" if o.anomalous is None else int(o.anomalous)
        writer.writerow([o.sample.path, o.sample.category, o.sample.defect_type, o.sample.label, repr(o.score), decision])
    return buffer.getvalue()


def default_output(config: RunConfig) -> Path:
    """``runs/<dataset>-<UTC timestamp>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.dataset}-{stamp}"


def _saved_model_folder(config: RunConfig, category: str) -> Path:
    root = Path(config.model or "")
    if (root / artifacts.MODEL_JSON).is_file():
        return root
    candidate = root / category / "model"
    if (candidate / artifacts.MODEL_JSON).is_file():
        return candidate
    raise VadError(f"--model {root}: no model.json there nor in {candidate}")


def check_saved_geometry(config: RunConfig, categories: list[str]) -> None:
    """``--model`` keeps the input geometry the model was fitted with: geometry options given
    with it must ask for the same (or be left out), else a clear error before anything is written."""
    import json

    from vad.geometry import Geometry

    if not config.sets_geometry:
        return
    requested = config.geometry()
    for category in categories:
        folder = _saved_model_folder(config, category)
        document = json.loads((folder / artifacts.MODEL_JSON).read_text(encoding="utf-8"))
        saved = Geometry.from_dict(document.get("geometry"))
        if not saved.same_choices(requested):
            raise VadError(
                f"--model {folder} was fitted with the input geometry '{saved.describe()}', but this run asks for "
                f"'{requested.describe()}': a saved model is used with the geometry it was fitted with; drop "
                "--image-size/--resize/--center-crop/--keep-aspect/--tile/--tile-stride, or fit a new model"
            )


def run_category(
    config: RunConfig, splits: DataSplits, folder: Path, registry: Registry, model: AnomalyModel | None = None
) -> CategoryResult:
    """Fit (or load) a model for one category, evaluate it and write its files; ``model`` is
    an unfitted model already composed from ``config``, else one is built."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    category_folder = folder / splits.category
    timings: dict[str, float] = {}
    if config.model:
        model = AnomalyModel.load(_saved_model_folder(config, splits.category), device, registry)
        info(f"[{splits.category}] loaded the saved model from {config.model}")
    else:
        model = (model or build_model(config, registry)).to(device)
        start = time.perf_counter()
        model.fit(splits.train, splits.validation)
        timings["fit_s"] = time.perf_counter() - start
        model.save(category_folder / "model", registry)
    start = time.perf_counter()
    outputs = list(model.predict(splits.test, description=f"test {splits.category}"))
    timings["predict_s"] = time.perf_counter() - start
    timings["predict_ms_per_image"] = 1000 * timings["predict_s"] / max(1, len(outputs))
    data = evaluation_data(outputs, model)
    calibration = dict(model.calibration)
    good = data.labels == 0
    if "image_false_alarm" in calibration and good.any():
        calibration["test_false_alarm_range"] = false_alarms_on(int(good.sum()), calibration["image_false_alarm"])
        calibration["test_false_alarm_observed"] = float(np.mean(data.scores[good] >= model.image_threshold))
        if false_alarm_warning(calibration):
            warn(f"[{splits.category}] {false_alarm_warning(calibration)}")
    values, skipped, computed = compute_metrics(data, config, registry, model.produces_maps)
    artifacts.atomic_write_text(category_folder / "scores.csv", scores_csv(outputs))
    if model.skipped:
        warn(f"[{splits.category}] skipped {len(model.skipped)} unreadable image(s): " + ", ".join(s.path for s in model.skipped))
    if config.report:
        from vad.report import write_category_report

        start = time.perf_counter()
        curves = [curve for metric in computed for curve in metric.curves(data)]
        write_category_report(category_folder, data, outputs, model, config, curves, calibration)
        timings["report_s"] = time.perf_counter() - start
    return CategoryResult(
        splits.category,
        values,
        skipped,
        timings,
        {"image": model.image_threshold, "pixel": model.pixel_threshold},
        calibration,
    )


#: Per category, where trained detectors keep their resumable checkpoints until the model is saved.
CHECKPOINTS_DIR = "checkpoints"


def run(config: RunConfig, registry: Registry | None = None, resume: bool = False) -> tuple[Path, list[CategoryResult]]:
    """Run every chosen category; returns the run folder and the results.

    With ``resume`` (``config.output`` an earlier run's folder): categories whose model was
    saved are evaluated with it, an interrupted training continues from its last checkpoint,
    and the remaining categories run as usual.
    """
    import yaml

    registry = registry or get_registry()
    registry.check()
    check_options(config, registry)
    dataset = create_dataset(config, registry)
    categories = config.categories or dataset.categories()
    if not categories:
        raise VadError(f"data set {config.dataset!r} has no categories under {config.root}")
    # Compose the first model before anything is written: a bad device, name or option fails
    # here and leaves no half-made run folder behind.
    resolve_device(config.device)
    seed_everything(config.seed)
    if config.model:
        check_saved_geometry(config, categories)
    first_model = None if config.model else build_model(config, registry)
    if first_model is not None and any(member.source is not None for member in first_model.members):
        config.backbones = backbone_specs(config, registry)  # config.yaml says which were used
    folder = Path(config.output) if config.output else default_output(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.output = str(folder)
    artifacts.atomic_write_text(folder / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    info(f"run folder: {folder}")
    try:
        results = _run_categories(config, dataset, categories, folder, registry, first_model, resume)
    except KeyboardInterrupt as interrupt:
        raise RunInterrupted(folder) from interrupt
    return _finish(config, dataset, folder, results)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what was written is whole (models are saved only when complete)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(
            f"interrupted: no half-written model is left in {folder} (a category's model is saved only once "
            f"it is complete); continue with `vad run --resume {folder}`"
        )


def _run_categories(config: RunConfig, dataset: Dataset, categories: list[str], folder: Path, registry: Registry, first_model: AnomalyModel | None, resume: bool) -> list[CategoryResult]:
    results = []
    for category in categories:
        splits = dataset.load(category)
        info(f"[{category}] {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test images")
        saved = folder / category / "model"
        if resume and not config.model and (saved / artifacts.MODEL_JSON).is_file():
            info(f"[{category}] --resume: the model was saved before, evaluating it")
            results.append(run_category(dataclasses.replace(config, model=str(saved)), splits, folder, registry))
        else:
            checkpoints = folder / category / CHECKPOINTS_DIR
            with session(checkpoints, resume=resume, every_minutes=config.checkpoint_minutes):
                results.append(run_category(config, splits, folder, registry, first_model))
            shutil.rmtree(checkpoints, ignore_errors=True)  # the saved model supersedes them
        first_model = None
    return results


def _finish(config: RunConfig, dataset: Dataset, folder: Path, results: list[CategoryResult]) -> tuple[Path, list[CategoryResult]]:
    """The run's tables, ``metrics.json`` and report."""
    per_category = {r.category: {**r.metrics, **{k: v for k, v in r.timings.items() if k != "predict_s"}} for r in results}
    write_results_table(folder, per_category)
    columns, rows = table_with_mean(per_category)
    artifacts.atomic_write_json(
        folder / "metrics.json",
        {
            "categories": {r.category: r.metrics for r in results},
            "mean": rows.get("mean", {}),
            "skipped_metrics": {r.category: r.skipped_metrics for r in results if r.skipped_metrics},
            "thresholds": {r.category: r.thresholds for r in results},
            "calibration": {r.category: r.calibration for r in results},
            "timings": {r.category: r.timings for r in results},
            "dataset_skipped_files": [list(item) for item in getattr(dataset, "skipped", [])],
        },
    )
    if config.report:
        from vad.report import write_run_report

        write_run_report(folder, results, config)
    return folder, results
