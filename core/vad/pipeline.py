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
from collections.abc import Iterator
from typing import Any

import numpy as np

from vad import artifacts, runfolder
from vad.config import RunConfig
from vad.build import backbone_specs, build_model, check_names, check_options, create_dataset
from vad.datacheck import check_splits
from vad.calibration import false_alarm_warning, false_alarms_on
from vad.contracts import DataSplits, Dataset, EvaluationData, Metric, Sample
from vad.errors import VadError
from vad.images import image_size, read_rgb
from vad.registration import Registration
from vad.model import AnomalyModel, Output, resolve_device, seed_everything
from vad.plugins import Registry, get_registry
from vad.progress import info, warn
from vad.decisions import decision_table, shot_tables
from vad.roi import Roi, read_roi_mask
from vad.tracking import DEFAULT_URI, check_tracking, log_run
from vad.results import table_with_mean, write_decisions_table, write_results_table
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
    #: The images that trained the model (none when a saved model was loaded).
    train_files: list[str] = field(default_factory=list)
    #: What each threshold rule decides on the test images (:mod:`vad.decisions`).
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The test images whose alignment to the reference failed, with why (:mod:`vad.registration`).
    registration_failures: dict[str, str] = field(default_factory=dict)
    #: The camera view this category is (multi-view data sets), and its test images' ``(path,
    #: label, score)``, from which the decisions per shot of all views are made.
    view: str | None = None
    images: list[tuple[str, int, float]] = field(default_factory=list)


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
        roi=None if model.roi is None else model.roi.mask,
    )


def scores_csv(outputs: list[Output], registered: bool = False) -> str:
    """Per-image raw scores and decisions (where the data set labels anomaly kinds, e.g. MVTec
    LOCO's structural / logical, each image's kind after its defect type; for a model that aligns
    images, why an image's alignment failed: empty when it succeeded)."""
    kinds = any(o.sample.anomaly_kind for o in outputs)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "category", "defect_type", *(["anomaly_kind"] if kinds else []), "label", "score", "decision", *(["registration_error"] if registered else [])])
    for o in outputs:
        decision = "" if o.anomalous is None else int(o.anomalous)
        kind = [o.sample.anomaly_kind or ""] if kinds else []
        extra = [o.registration_error or ""] if registered else []
        writer.writerow([o.sample.path, o.sample.category, o.sample.defect_type, *kind, o.sample.label, repr(o.score), decision, *extra])
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


def check_saved_models(config: RunConfig, categories: list[str]) -> None:
    """``--model``: every category has a readable saved model (:func:`vad.artifacts.read_model_document`),
    and geometry options given with it ask for the geometry it was fitted with (or are left out);
    checked before anything is written."""
    from vad.geometry import Geometry

    requested = config.geometry() if config.sets_geometry else None
    for category in categories:
        folder = _saved_model_folder(config, category)
        document = artifacts.read_model_document(folder)
        saved = Geometry.from_dict(document.get("geometry"))
        if requested is not None and not saved.same_choices(requested):
            raise VadError(
                f"--model {folder} was fitted with the input geometry '{saved.describe()}', but this run asks for "
                f"'{requested.describe()}': a saved model is used with the geometry it was fitted with; drop "
                "--image-size/--resize/--center-crop/--keep-aspect/--tile/--tile-stride, or fit a new model"
            )


def run_category(
    config: RunConfig, splits: DataSplits, folder: Path, registry: Registry, model: AnomalyModel | None = None,
    frames: tuple[Roi | None, Registration | None] | None = None,
) -> CategoryResult:
    """Fit (or load) a model for one category, evaluate it and write its files; ``model`` is
    an unfitted model already composed from ``config``, else one is built; ``frames``: the
    category's region of interest and registration when the run's checks built them already
    (else they are built here from ``config``)."""
    config = config.for_category(splits.category)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    category_folder = folder / splits.category
    timings: dict[str, float] = {}
    if config.model:
        model = AnomalyModel.load(_saved_model_folder(config, splits.category), device, registry)
        info(f"[{splits.category}] loaded the saved model from {config.model}")
    else:
        model = (model or build_model(config, registry)).to(device)
        model.roi, model.registration = frames if frames is not None else category_frames(config, splits)
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
    decisions = decision_table(model, data.scores, data.labels, registry, config.options_for) if outputs else {}
    view = outputs[0].sample.view if outputs else None
    artifacts.atomic_write_text(category_folder / "scores.csv", scores_csv(outputs, model.registration is not None))
    failures = {o.sample.path: o.registration_error for o in outputs if o.registration_error}
    if failures:
        warn(f"[{splits.category}] registration failed for {len(failures)} test image(s), scored unaligned (listed in scores.csv and metrics.json): "
             + "; ".join(f"{path} ({reason})" for path, reason in list(failures.items())[:3]))
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
        [] if config.model else [sample.path for sample in splits.train],
        decisions,
        failures,
        view,
        [(o.sample.path, o.sample.label, o.score) for o in outputs] if view is not None else [],
    )


#: Per category, where trained detectors keep their resumable checkpoints until the model is saved.
CHECKPOINTS_DIR = "checkpoints"


def run(
    config: RunConfig, registry: Registry | None = None, resume: bool = False, overwrite: bool = False
) -> tuple[Path, list[CategoryResult]]:
    """Run every chosen category; returns the run folder and the results.

    Everything that can be checked is checked before the run folder is touched: names, options,
    the composed model, the data set's layout and every image and mask (:mod:`vad.datacheck`).
    The folder is then claimed (:mod:`vad.runfolder`: locked, refused when it holds a run
    unless ``overwrite`` or ``resume``) and marked complete only after its last file.

    With ``resume`` (``config.output`` an earlier run's folder): categories whose model was
    saved are evaluated with it, an interrupted training continues from its last checkpoint,
    and the remaining categories run as usual.
    """
    import yaml

    registry = registry or get_registry()
    registry.check()
    check_names(config, registry)
    check_options(config, registry)
    check_tracking(config.track, config.tracking_uri)
    dataset = create_dataset(config, registry)
    categories = config.categories or dataset.categories()
    if not categories:
        raise VadError(f"data set {config.dataset!r} has no categories under {config.root}")
    resolve_device(config.device)
    seed_everything(config.seed)
    check_category_options(config, dataset.categories(), categories, registry)
    if config.model:
        check_saved_models(config, categories)
    first_model = None if config.model else build_model(config.for_category(categories[0]), registry)
    if first_model is not None and any(member.source is not None for member in first_model.members):
        config.backbones = backbone_specs(config, registry)  # config.yaml says which were used
    checked = {category: _checked_splits(dataset, category, config, first_model) for category in categories}
    splits = {category: pair[0] for category, pair in checked.items()}
    frames = {category: pair[2] for category, pair in checked.items()}
    handed_over = [first_model] if first_model is not None else []  # popped by the first category: no fitted
    first_model = None  # model of one category stays referenced here through the next ones
    output = Path(config.output) if config.output else None
    with runfolder.claim(output, default_output(config), overwrite=overwrite, resume=resume) as claimed:
        folder = claimed.path
        config.output = str(folder)
        artifacts.atomic_write_text(folder / runfolder.RUN_CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))
        info(f"run folder: {folder}")
        try:
            results = _run_categories(config, splits, frames, folder, registry, handed_over, resume)
        except KeyboardInterrupt as interrupt:
            raise RunInterrupted(folder) from interrupt
        _finish(config, folder, results, {category: pair[1] for category, pair in checked.items() if pair[1]})
        claimed.finish()
    if config.track:
        try:
            info(f"logged to {config.track}: run {log_run(folder, config)} ({config.tracking_uri or DEFAULT_URI})")
        except Exception as error:  # the run is complete and stays so; only its copy in the tracker is missing
            warn(f"the run is complete in {folder}, but logging it to {config.track} failed: {type(error).__name__}: {error}")
    return folder, results


def check_category_options(config: RunConfig, known: list[str], categories: list[str], registry: Registry) -> None:
    """``category_options`` names categories of the data set, and each category of the run gets
    options its components declare (checked as ``--set`` is, placeholders replaced)."""
    unknown = sorted(set(config.category_options) - set(known))
    if unknown:
        raise VadError(f"category_options names {', '.join(map(repr, unknown))}, which the data set {config.dataset!r} does not have (its categories: {', '.join(known)})")
    for category in categories:
        try:
            check_options(config.for_category(category), registry)
        except VadError as error:
            raise VadError(f"[{category}] {error}") from error


def _checked_splits(
    dataset: Dataset, category: str, config: RunConfig, model: AnomalyModel | None
) -> tuple[DataSplits, list[tuple[str, str]], tuple[Roi | None, Registration | None] | None]:
    """One category's samples, every image and mask decoded once (:mod:`vad.datacheck`), the
    files left out with ``--skip-bad`` (``(path, reason)``: by the data set's header check or by
    decoding; each is listed on the terminal), and, for a model to fit, the category's region of
    interest and registration (built and checked here, used by :func:`run_category`). A model to
    fit must be able to calibrate its thresholds with the images left."""
    known = len(getattr(dataset, "skipped", []))
    splits = dataset.load(category)
    skipped = [tuple(item) for item in getattr(dataset, "skipped", [])[known:]]
    if skipped:
        warn(f"[{category}] --skip-bad: left out {len(skipped)} unreadable file(s): " + "; ".join(f"{p} ({r})" for p, r in skipped))
    splits, bad = check_splits(splits, config.skip_bad)
    if not splits.train and not config.model:
        raise VadError(f"[{category}] no usable training images are left: a detector needs normal training images")
    if config.train_count is not None and not config.model:
        splits = dataclasses.replace(splits, train=chosen_training_images(splits.train, config.train_count, config.seed, category))
    frames = None
    if model is not None:
        model.check_calibration(len(splits.train), len(splits.validation))
        frames = category_frames(config, splits)
        if frames[0] is not None:
            model.check_roi(frames[0])
    return splits, [*skipped, *((b.path, b.reason) for b in bad)], frames


def category_frames(config: RunConfig, splits: DataSplits) -> tuple[Roi | None, Registration | None]:
    """The category's region of interest and registration as ``config`` asks (None: not asked)."""
    return (
        category_roi(config, splits) if config.roi is not None else None,
        category_registration(config, splits) if config.registration is not None else None,
    )


def _every_size(splits: DataSplits) -> Iterator[tuple[tuple[int, int], str]]:
    """``((H, W), path)`` of every image of the category (file headers, or decoded in-memory images)."""
    for sample in [*splits.train, *splits.validation, *splits.test]:
        yield (image_size(sample.path) if sample.image_loader is None else sample.load_image().shape[:2]), sample.path


def category_registration(config: RunConfig, splits: DataSplits) -> Registration:
    """The registration ``config`` asks for, with this category's reference (the given image or
    its first training image); every image of the category must have the reference's size."""
    reference = read_rgb(config.registration_reference) if config.registration_reference else splits.train[0].load_image()
    try:
        registration = Registration(reference, str(config.registration), **config.registration_options)
    except TypeError as error:
        raise VadError(f"registration_options: {error}") from error
    for size, path in _every_size(splits):
        registration.check_image(size, path)
    return registration


def category_roi(config: RunConfig, splits: DataSplits) -> Roi | None:
    """The region of interest ``config.roi`` gives this category (None: a mapping that gives it
    null, the whole image), in the frame of its first training image; every image of the category
    (test included) must have that size."""
    spec = config.roi
    if isinstance(spec, dict):
        if splits.category not in spec and "*" not in spec:
            raise VadError(
                f"roi names no region for category {splits.category!r} (keys: {', '.join(map(str, spec))}); add it, "
                "a '*' entry, or null for the whole image"
            )
        spec = spec.get(splits.category, spec.get("*"))
        if spec is None:
            return None
    size = splits.train[0].load_image().shape[:2]
    roi = Roi(read_roi_mask(spec, size, splits.category), config.roi_mode, tuple(config.roi_fill))
    for shape, path in _every_size(splits):
        roi.check_image(shape, path)
    return roi


def chosen_training_images(train: list[Sample], count: Any, seed: int, category: str) -> list[Sample]:
    """The few-shot protocol's ``count`` training images: the first ``count`` of one seeded
    permutation of the (path-sorted) training images, so a larger count keeps a smaller one's
    images and a sweep over counts varies only the number."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise VadError(f"train_count must be a whole number of at least 1 (leave it out for every training image), got {count!r}")
    if count > len(train):
        raise VadError(f"[{category}] train_count {count} asks for more training images than the {len(train)} there are")
    ordered = sorted(train, key=lambda sample: sample.path)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[index] for index in order[:count]]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what was written is whole (models are saved only when complete)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(
            f"interrupted: no half-written model is left in {folder} (a category's model is saved only once "
            f"it is complete); continue with `vad run --resume {folder}`"
        )


def _run_categories(
    config: RunConfig, splits: dict[str, DataSplits], frames: dict[str, Any], folder: Path, registry: Registry, handed_over: list[AnomalyModel], resume: bool
) -> list[CategoryResult]:
    """Each category in turn; the first uses the model built while checking the run (``handed_over``
    is emptied, so it is freed after that category), the others build their own."""
    results = []
    for category, category_splits in splits.items():
        first_model = handed_over.pop() if handed_over else None
        info(f"[{category}] {len(category_splits.train)} train, {len(category_splits.validation)} validation, {len(category_splits.test)} test images")
        saved = folder / category / "model"
        if resume and not config.model and (saved / artifacts.MODEL_JSON).is_file():
            info(f"[{category}] --resume: the model was saved before, evaluating it")
            results.append(run_category(dataclasses.replace(config, model=str(saved)), category_splits, folder, registry))
        else:
            checkpoints = folder / category / CHECKPOINTS_DIR
            with session(checkpoints, resume=resume, every_minutes=config.checkpoint_minutes):
                results.append(run_category(config, category_splits, folder, registry, first_model, frames[category]))
            shutil.rmtree(checkpoints, ignore_errors=True)  # the saved model supersedes them
        del first_model
    return results


def _finish(config: RunConfig, folder: Path, results: list[CategoryResult], skipped_files: dict[str, list[tuple[str, str]]]) -> None:
    """The run's tables, ``metrics.json`` (with the files ``--skip-bad`` left out) and report."""
    per_category = {r.category: {**r.metrics, **{k: v for k, v in r.timings.items() if k != "predict_s"}} for r in results}
    write_results_table(folder, per_category)
    write_decisions_table(folder, {r.category: r.decisions for r in results})
    shots, shot_problems = shot_tables({r.category: {"view": r.view, "images": r.images, "decisions": r.decisions} for r in results if r.view})
    write_decisions_table(folder, shots, "machine", "shot_decisions")
    for machine, problem in shot_problems.items():
        warn(f"[{machine}] no decisions per shot: {problem}")
    columns, rows = table_with_mean(per_category)
    artifacts.atomic_write_json(
        folder / "metrics.json",
        {
            "categories": {r.category: r.metrics for r in results},
            "mean": rows.get("mean", {}),
            "skipped_metrics": {r.category: r.skipped_metrics for r in results if r.skipped_metrics},
            "thresholds": {r.category: r.thresholds for r in results},
            "calibration": {r.category: r.calibration for r in results},
            "decisions": {r.category: r.decisions for r in results},
            **({"shot_decisions": shots} if shots else {}),
            **({"shot_problems": shot_problems} if shot_problems else {}),
            **({"registration_failures": {r.category: r.registration_failures for r in results}} if config.registration else {}),
            "timings": {r.category: r.timings for r in results},
            "skipped_files": {category: [list(item) for item in items] for category, items in skipped_files.items()},
            "train_images": {r.category: len(r.train_files) for r in results if r.train_files},
            **({"train_files": {r.category: r.train_files for r in results}} if config.train_count is not None else {}),
        },
    )
    if config.report:
        from vad.report import write_run_report

        write_run_report(folder, results, config)
