"""The run configuration: defaults, ``--config run.yaml``, command-line overrides.

Precedence: built-in defaults < the YAML file < command-line options. Options of any plugin
are given by its registered name, in YAML under ``options:`` or on the command line as
``--set NAME.KEY=VALUE`` (values parsed as YAML scalars: ``--set patchcore.coreset_ratio=0.01``).
Options of one category go in YAML under ``category_options: {CATEGORY: {NAME: {KEY: VALUE}}}``;
``{category}`` in a string value becomes each category's name (quote it in YAML:
``class_name: "{category}"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vad.errors import VadError
from vad.options import Options, option

#: What a run uses when the user names nothing, and how tables are ordered: the only plugin
#: names the core holds (the first-party plugins'; the backbones' weights ship offline). A
#: feature-level ensemble without explicit backbones fuses ``ensemble_backbones``: Lite0's
#: features and the residuals of seed 003's feature autoencoder trained on them, the member set
#: that won the heterogeneous study (docs/demo-results.md).
DEFAULTS: dict[str, Any] = {
    "dataset": "demo",
    "detector": "patchcore",
    "backbone": "tf_efficientnet_lite0",
    "ensemble_backbones": ("tf_efficientnet_lite0", "detector:feature-ae"),
    "threshold": "conformal",
    # metric columns that lead the `vad bench` table, in this order (the others follow by name)
    "table_metrics": ("image_auroc", "pixel_auroc", "au_pro", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap"),
}


#: In a string option value, replaced by the category a model is built for.
CATEGORY_PLACEHOLDER = "{category}"


class ReportOptions(Options):
    """Options of the run report (``--set report.KEY=VALUE``)."""

    max_overlays: int = option(32, "Overlay strips per category: every defective image, then the highest-scoring good ones (0: all).", ge=0)


@dataclass
class RunConfig:
    """Everything ``vad run`` needs; written resolved to the run folder as ``config.yaml``."""

    dataset: str = DEFAULTS["dataset"]
    root: str | None = None
    categories: list[str] = field(default_factory=list)
    detectors: list[str] = field(default_factory=lambda: [DEFAULTS["detector"]])
    backbones: list[str] = field(default_factory=list)
    ensemble: str | None = None
    layers: list[str] | None = None
    aggregation: int = 3
    layer_dim: int | None = None
    target_dim: int | None = None
    weights: str | None = None
    pretrained: bool = True
    threshold: str = DEFAULTS["threshold"]
    metrics: list[str] | None = None
    #: A validation split taken by the data set (0: every training image trains the detector,
    #: and thresholds are calibrated as ``calibration`` says).
    validation_fraction: float = 0.0
    #: Few-shot protocol: train on this many normal training images, a seeded choice (``seed``;
    #: a larger count keeps the images of a smaller one); None: every training image.
    train_count: int | None = None
    #: How thresholds get normal scores the detector has not seen (:mod:`vad.calibration`).
    calibration: str = "auto"
    folds: int = 5
    holdout_fraction: float = 0.2
    #: Input geometry (:mod:`vad.geometry`): the network input size of every member
    #: (``[H, W]``; with ``keep_aspect`` the shorter side), or ``resize`` then ``center_crop``;
    #: ``tile`` px tiles ``tile_stride`` apart (default: no overlap). Saved in model.json.
    image_size: list[int] | None = None
    resize: list[int] | None = None
    center_crop: list[int] | None = None
    keep_aspect: bool = False
    tile: int | None = None
    tile_stride: int | None = None
    #: Region of interest (:mod:`vad.roi`): a mask PNG or polygons (lists of [x, y] vertices)
    #: for every category, or a mapping from category (``"*"``: the others) to one; ``roi_mode``
    #: before (paint outside it) or after (restrict the map); ``roi_fill`` the paint [R, G, B].
    roi: Any = None
    roi_mode: str = "after"
    roi_fill: list[int] = field(default_factory=lambda: [0, 0, 0])
    #: Image registration (:mod:`vad.registration`): None, translation, rigid or affine; every
    #: image aligned to ``registration_reference`` (a path; default: the first training image)
    #: with ``registration_options`` (keypoints, ratio, residual, min_inliers, min_overlap).
    registration: str | None = None
    registration_reference: str | None = None
    registration_options: dict[str, Any] = field(default_factory=dict)
    #: Experiment tracking (:mod:`vad.tracking`): None or mlflow; any MLflow tracking URI
    #: (default: ./mlflow.db, artifacts in ./mlruns) and the experiment's name.
    track: str | None = None
    tracking_uri: str | None = None
    tracking_experiment: str = "vad"
    sigma: float = 4.0
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    output: str | None = None
    model: str | None = None
    skip_bad: bool = False
    save_maps: bool = False
    report: bool = True
    #: Trained detectors write a resumable checkpoint at the end of an epoch this often (0:
    #: every epoch); ``vad run --resume RUN_FOLDER`` continues from it.
    checkpoint_minutes: float = 5.0
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Options of one category over ``options``: ``{category: {name: {KEY: VALUE}}}`` (YAML),
    #: e.g. AnomalyDINO's masking for the categories its paper masks. In any string option
    #: value ``{category}`` becomes the category's name (``--set winclip.class_name={category}``).
    category_options: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.category_options, dict) or not all(
            isinstance(groups, dict) and all(isinstance(values, dict) for values in groups.values()) for groups in self.category_options.values()
        ):
            raise VadError("category_options maps each category to {name: {KEY: VALUE}}, e.g. {capsule: {anomaly-dino: {masking: true}}}")
        self.category_options = {str(category): groups for category, groups in self.category_options.items()}

    def options_for(self, name: str | None) -> dict[str, Any]:
        """The ``options`` given for a registered name."""
        return dict(self.options.get(name or "", {}))

    def for_category(self, category: str) -> RunConfig:
        """The configuration one category's model is built with: its ``category_options`` over
        ``options``, and ``{category}`` in string option values replaced by its name."""
        merged = {name: dict(values) for name, values in self.options.items()}
        for name, values in (self.category_options.get(category) or {}).items():
            merged.setdefault(name, {}).update(values)
        options = {
            name: {key: value.replace(CATEGORY_PLACEHOLDER, category) if isinstance(value, str) else value for key, value in values.items()}
            for name, values in merged.items()
        }
        return dataclasses.replace(self, options=options)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for YAML."""
        return dataclasses.asdict(self)

    #: The fields of the input geometry (:mod:`vad.geometry`), as RunConfig and CLI name them.
    GEOMETRY_FIELDS = ("image_size", "resize", "center_crop", "keep_aspect", "tile", "tile_stride")

    def geometry(self):  # -> vad.geometry.Geometry (imported lazily: it imports torch)
        """The validated input geometry these options ask for."""
        from vad.geometry import Geometry

        return Geometry.create(**{name: getattr(self, name) for name in self.GEOMETRY_FIELDS})

    @property
    def sets_geometry(self) -> bool:
        """True when any geometry option is given."""
        return any(getattr(self, name) not in (None, False) for name in self.GEOMETRY_FIELDS)


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def parse_set(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """``["patchcore.coreset_ratio=0.01"]`` -> ``{"patchcore": {"coreset_ratio": 0.01}}``."""
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        name, dot, option_name = key.rpartition(".")
        if not sep or not dot or not name or not option_name:
            raise VadError(f"--set expects NAME.KEY=VALUE (e.g. {DEFAULTS['detector']}.seed=1), got {assignment!r}")
        if CATEGORY_PLACEHOLDER in raw:  # a string to fill per category (YAML would read {category} as a mapping)
            options.setdefault(name, {})[option_name] = raw
            continue
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise VadError(
                f"--set {key}: the value {raw!r} is not valid YAML ({problem}); quote strings and close brackets, "
                f"e.g. --set '{key}=[1, 2]'"
            ) from error
        options.setdefault(name, {})[option_name] = value
    return options


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping in a YAML file, or a VadError naming ``what`` the file is and what it must hold."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise VadError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise VadError(f"{what} {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise VadError(f"{what} {path} must hold a mapping of {expected}")
    return dict(data)


def load_config(path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults, then the YAML file, then ``overrides`` (None values are ignored)."""
    data: dict[str, Any] = {}
    if path:
        data = read_yaml_mapping(path, "config file", "options")
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            import difflib

            hints = [f"{u!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, FIELDS, 1)) else "") for u in unknown]
            raise VadError(f"config file {path} has unknown keys: {', '.join(hints)}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "options":
            merged = {name: dict(opts) for name, opts in (data.get("options") or {}).items()}
            for name, opts in value.items():
                merged.setdefault(name, {}).update(opts)
            data["options"] = merged
        else:
            data[key] = value
    for key in ("categories", "detectors", "backbones"):
        if isinstance(data.get(key), str):
            data[key] = [data[key]]
    config = RunConfig(**data)
    if not config.detectors:
        raise VadError("no detector chosen: pass --detector NAME")
    if not 0 <= config.validation_fraction < 1:
        raise VadError(f"validation_fraction must be in [0, 1), got {config.validation_fraction}")
    if config.batch_size < 1:
        raise VadError(f"batch_size must be at least 1, got {config.batch_size}")
    if not config.sigma >= 0:
        raise VadError(f"sigma must be >= 0 (0: no blur), got {config.sigma}")
    from vad.calibration import METHODS

    if config.calibration not in METHODS:
        raise VadError(f"unknown calibration {config.calibration!r}; choose one of {', '.join(METHODS)}")
    if config.folds < 2:
        raise VadError(f"folds must be at least 2, got {config.folds}")
    if not 0 < config.holdout_fraction < 1:
        raise VadError(f"holdout_fraction must be in (0, 1), got {config.holdout_fraction}")
    if not config.checkpoint_minutes >= 0:
        raise VadError(f"checkpoint_minutes must be >= 0, got {config.checkpoint_minutes}")
    from vad.roi import MODES

    if config.roi_mode not in MODES:
        raise VadError(f"roi_mode must be one of {', '.join(MODES)}, got {config.roi_mode!r}")
    if config.roi is not None and config.model:
        raise VadError("--roi is saved with a fitted model: a model given with --model keeps its own region of interest; drop --roi")
    from vad.registration import KINDS

    if config.registration is not None and config.registration not in KINDS:
        raise VadError(f"registration must be one of {', '.join(KINDS)} (or left out), got {config.registration!r}")
    if config.registration is not None and config.model:
        raise VadError("--registration is saved with a fitted model: a model given with --model keeps its own; drop --registration")
    unknown = sorted(set(config.registration_options) - {"keypoints", "ratio", "residual", "min_inliers", "min_overlap"})
    if unknown:
        raise VadError(f"registration_options has unknown keys {unknown}; known: keypoints, ratio, residual, min_inliers, min_overlap")
    geometry = config.geometry()  # validates; sizes are saved as [H, W]
    config.image_size, config.resize, config.center_crop = (
        None if size is None else list(size) for size in (geometry.image_size, geometry.resize, geometry.center_crop)
    )
    return config
