"""``vad run``: dataset -> preprocessing -> feature source / ensemble -> detector -> postprocess
-> threshold -> metrics -> run folder, for each chosen category.

The run folder holds ``config.yaml`` (resolved), ``metrics.json``, ``results.{csv,md,json}``
and per category ``<category>/model/`` (the fitted model folder) and ``<category>/scores.csv``.
"""

from __future__ import annotations

import csv
import inspect
import io
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vad import artifacts
from vad.config import RunConfig
from vad.contracts import DataSplits, Dataset, EvaluationData, FeatureSource, ScoreEnsembler
from vad.errors import VadError
from vad.model import AnomalyModel, Member, Output, create_backbone, resolve_device, seed_everything
from vad.plugins import Registry, get_registry
from vad.progress import info, warn
from vad.results import table_with_mean, write_results_table


def _with_seed(cls: type, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """Pass the run's seed to constructors that take one, unless the user set it."""
    if "seed" not in options and "seed" in inspect.signature(cls).parameters:
        return {**options, "seed": seed}
    return options


#: ``--backbone detector:NAME`` makes a detector's learned features a member (``detector:draem``).
DETECTOR_SOURCE_PREFIX = "detector:"


def build_detector_source(name: str, config: RunConfig, registry: Registry) -> FeatureSource:
    """The FeatureSource of an (unfitted) detector, trained when its ensemble is fitted."""
    cls = registry.load_class("detectors", name)
    source = cls(**_with_seed(cls, config.options_for(name), config.seed)).feature_source()
    if source is None:
        raise VadError(f"detector {name!r} offers no feature source, so --backbone detector:{name} cannot use it")
    return source


def build_sources(config: RunConfig, registry: Registry) -> list[FeatureSource]:
    """One patch-feature source per backbone (``detector:NAME``: that detector's features)."""
    from vad.features import PatchFeatures

    specs = config.resolved_backbones()
    if config.weights and len(specs) > 1:
        raise VadError("--weights names one file, but several backbones were chosen; give each its weights with --set BACKBONE.weights=PATH")
    sources = []
    for spec in specs:
        if spec.startswith(DETECTOR_SOURCE_PREFIX):
            sources.append(build_detector_source(spec[len(DETECTOR_SOURCE_PREFIX) :], config, registry))
            continue
        options = {"pretrained": config.pretrained, **config.options_for(spec)}
        if config.weights:
            options["weights"] = config.weights
        backbone = create_backbone(spec, registry, **options)
        sources.append(PatchFeatures(backbone, config.layers, config.aggregation, config.layer_dim, config.target_dim))
    if not config.pretrained:
        warn("backbones are RANDOMLY INITIALISED (--no-pretrained): scores are not meaningful for comparison")
    return sources


def build_model(config: RunConfig, registry: Registry | None = None) -> AnomalyModel:
    """Compose the plugins named in ``config`` into an unfitted :class:`AnomalyModel`."""
    registry = registry or get_registry()
    registry.check()
    detector_classes = {name: registry.load_class("detectors", name) for name in config.detectors}
    ensembler_cls = registry.load_class("ensemblers", config.ensemble) if config.ensemble else None
    score_level = ensembler_cls is not None and issubclass(ensembler_cls, ScoreEnsembler)
    needs_features = any(cls.input == "features" for cls in detector_classes.values())
    sources = build_sources(config, registry) if needs_features else []

    if ensembler_cls is not None and not score_level:
        sources = [ensembler_cls(sources, **config.options_for(config.ensemble))]
    if not score_level and (len(config.detectors) > 1 or len(sources) > 1):
        raise VadError(
            "several detectors or backbones need an ensemble: --ensemble pca-global / pca-individual / "
            "concat fuse backbones' features; --ensemble score-mean (score-max, rank-mean, weighted) fuses scores"
        )

    members = []
    for name, cls in detector_classes.items():
        for source in sources if cls.input == "features" else [None]:
            detector = cls(**_with_seed(cls, config.options_for(name), config.seed))
            members.append(Member(name, detector, source))
    ensembler = ensembler_cls(**config.options_for(config.ensemble)) if score_level else None
    if score_level and len(members) < 2:
        raise VadError(f"--ensemble {config.ensemble} fuses several members; give two or more --detector or --backbone")
    threshold_cls = registry.load_class("thresholds", config.threshold)
    return AnomalyModel(
        members,
        ensembler=ensembler,
        ensembler_name=config.ensemble if score_level else None,
        threshold=threshold_cls(**config.options_for(config.threshold)),
        threshold_name=config.threshold,
        sigma=config.sigma,
        batch_size=config.batch_size,
        skip_bad=config.skip_bad,
        seed=config.seed,
    )


def create_dataset(config: RunConfig, registry: Registry) -> Dataset:
    """The dataset plugin with the run's root, validation fraction, seed and skip-bad policy."""
    cls = registry.load_class("datasets", config.dataset)
    options = {"validation_fraction": config.validation_fraction, "seed": config.seed, "skip_bad": config.skip_bad}
    return cls(root=config.root, **{**options, **config.options_for(config.dataset)})


@dataclass
class CategoryResult:
    """One category's metrics, the reasons metrics were skipped, and timings."""

    category: str
    metrics: dict[str, float | None]
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float | None] = field(default_factory=dict)


def compute_metrics(data: EvaluationData, config: RunConfig, registry: Registry, produces_maps: bool) -> tuple[dict[str, float | None], dict[str, str]]:
    """Every registered (or chosen) metric that applies; the others with the reason they do not."""
    names = config.metrics or sorted(registry.entries("metrics"))
    values: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
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
        for key, number in (value.items() if isinstance(value, dict) else [(name, value)]):
            # NaN is not JSON and not a result: report it as missing
            values[key] = None if number is None or not np.isfinite(number) else float(number)
    return values, skipped


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
    values, skipped = compute_metrics(data, config, registry, model.produces_maps)
    artifacts.atomic_write_text(category_folder / "scores.csv", scores_csv(outputs))
    if model.skipped:
        warn(f"[{splits.category}] skipped {len(model.skipped)} unreadable image(s): " + ", ".join(s.path for s in model.skipped))
    if config.report:
        from vad.report import write_category_report

        write_category_report(category_folder, data, outputs, model, config)
    return CategoryResult(
        splits.category,
        values,
        skipped,
        timings,
        {"image": model.image_threshold, "pixel": model.pixel_threshold},
    )


def run(config: RunConfig, registry: Registry | None = None) -> tuple[Path, list[CategoryResult]]:
    """Run every chosen category; returns the run folder and the results."""
    import yaml

    registry = registry or get_registry()
    registry.check()
    dataset = create_dataset(config, registry)
    categories = config.categories or dataset.categories()
    if not categories:
        raise VadError(f"data set {config.dataset!r} has no categories under {config.root}")
    # Compose the first model before anything is written: a bad device, name or option fails
    # here and leaves no half-made run folder behind.
    resolve_device(config.device)
    seed_everything(config.seed)
    first_model = None if config.model else build_model(config, registry)
    folder = Path(config.output) if config.output else default_output(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.output = str(folder)
    artifacts.atomic_write_text(folder / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    info(f"run folder: {folder}")
    results = []
    for category in categories:
        splits = dataset.load(category)
        info(f"[{category}] {len(splits.train)} train, {len(splits.validation)} validation, {len(splits.test)} test images")
        results.append(run_category(config, splits, folder, registry, first_model))
        first_model = None
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
            "timings": {r.category: r.timings for r in results},
            "dataset_skipped_files": [list(item) for item in getattr(dataset, "skipped", [])],
        },
    )
    if config.report:
        from vad.report import write_run_report

        write_run_report(folder, results, config)
    return folder, results
