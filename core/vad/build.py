"""Building components: from a run configuration, and back from a saved ``model.json``.

The two directions live here side by side and mirror each other: what
:func:`model_document` writes for a member, a feature source or an ensembler,
:func:`model_from_document` reads back into the same objects. The core decides what a
component *is* from its type (a :class:`~vad.contracts.ScoreEnsembler` or a
:class:`~vad.contracts.FeatureEnsembler`, a detector reading images or features), never from
its name; the only plugin names the core holds are the defaults in :data:`vad.config.DEFAULTS`.

Saved layout of one feature source (``config()`` of the source; unchanged since format 1):

* a backbone's patch features: ``{"kind": "patch-features", "hparams": {"backbone": {"spec",
  "hparams"}, <options>}}``;
* a feature ensemble: ``{"kind": <ensembler name>, "hparams": {"members": [<source>...],
  <options>}}``;
* a trained detector's features: ``{"kind": "detector-features", "detector": <detector name>,
  "hparams": {"detector": <detector options>, <source options>}}``.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import vad
from vad import artifacts
from vad.config import DEFAULTS, ReportOptions, RunConfig
from vad.contracts import Dataset, DetectorFeatures, FeatureEnsembler, FeatureSource, ScoreEnsembler, State
from vad.errors import UnknownNameError, VadError
from vad.features import PatchFeatures
from vad.geometry import Geometry
from vad.registration import Registration
from vad.roi import Roi
from vad.plugins import KINDS, Registry, backbone_entry, create_backbone, get_registry
from vad.progress import warn

if TYPE_CHECKING:
    from vad.model import AnomalyModel

#: ``--backbone detector:NAME`` makes a detector's learned features a member (``detector:draem``).
DETECTOR_SOURCE_PREFIX = "detector:"
#: Option groups of the core itself (``--set report.max_overlays=0``), besides registered names.
CORE_OPTION_GROUPS = ("report",)


# --------------------------------------------------------------------------- one component


def create(kind: str, name: str, registry: Registry, *args: Any, run_seed: int | None = None, **options: Any) -> Any:
    """The registered ``name`` of ``kind`` built with ``options``; the run's seed (``run_seed``) is passed
    to classes that declare a ``seed`` option, unless the user set it."""
    cls = registry.load_class(kind, name)
    if run_seed is not None and "seed" not in options and "seed" in cls.Options.fields():
        options = {**options, "seed": run_seed}
    return cls(*args, **options)


def is_score_ensembler(name: str | None, registry: Registry) -> bool:
    """True when ``name`` is a registered score-level ensembler (decided by its type)."""
    return name is not None and issubclass(registry.load_class("ensemblers", name), ScoreEnsembler)


def backbone_specs(config: RunConfig, registry: Registry) -> list[str]:
    """The backbones a run uses: the explicit ones, else the defaults (two members for a
    feature-level ensemble, one otherwise)."""
    if config.backbones:
        return list(config.backbones)
    if config.ensemble is not None and not is_score_ensembler(config.ensemble, registry):
        return list(DEFAULTS["ensemble_backbones"])
    return [DEFAULTS["backbone"]]


# --------------------------------------------------------------------------- options


def used_components(config: RunConfig, registry: Registry) -> dict[str, set[str]]:
    """``{kind: registered names}`` a run with ``config`` uses (augmentations are chosen inside
    detectors' options, so every installed one counts as usable)."""
    specs = backbone_specs(config, registry)
    detectors = set(config.detectors) | {s[len(DETECTOR_SOURCE_PREFIX) :] for s in specs if s.startswith(DETECTOR_SOURCE_PREFIX)}
    return {
        "detectors": detectors,
        "backbones": {backbone_entry(s, registry)[0] for s in specs if not s.startswith(DETECTOR_SOURCE_PREFIX)},
        "datasets": {config.dataset},
        "ensemblers": {config.ensemble} if config.ensemble else set(),
        "thresholds": {config.threshold},
        "metrics": set(config.metrics or registry.entries("metrics")),
        "augmentations": set(registry.entries("augmentations")),
        # not a registry kind: the detectors whose feature sources are members (their --set group is detector:NAME)
        "detector sources": {s for s in specs if s.startswith(DETECTOR_SOURCE_PREFIX)},
    }


def uses_group(group: str, used: dict[str, set[str]], registry: Registry) -> bool:
    """True when the ``--set`` group ``group`` names a component in ``used``
    (:func:`used_components`; a backbone spec counts as its registered entry) or a core group."""
    entry = backbone_entry(group, registry)[0]
    return group in CORE_OPTION_GROUPS or any(group in names or entry in names for names in used.values())


def check_names(config: RunConfig, registry: Registry) -> None:
    """Every component ``config`` names is installed (an unknown name lists what is, with the
    nearest match); checked before anything is built or written."""
    used = used_components(config, registry)
    for kind in KINDS:
        for name in sorted(used.get(kind, ())):
            registry.get(kind, name)


def check_options(config: RunConfig, registry: Registry, *, used_only: bool = True) -> None:
    """Every ``--set NAME.KEY=VALUE`` names a registered component (or a core group) and a value
    its declaration allows, and (``used_only``) a component this run uses: an option for a
    component the run does not use would silently do nothing. Checked before anything is built
    or written."""
    used = used_components(config, registry) if used_only else None
    for group, values in config.options.items():
        if group in CORE_OPTION_GROUPS:
            ReportOptions.parse(values, owner="report")
            continue
        if group.startswith(DETECTOR_SOURCE_PREFIX):
            _check_source_group(group, config, registry, used_only)
            continue
        declarations = []
        for kind in KINDS:
            entry_name = backbone_entry(group, registry)[0] if kind == "backbones" else group
            if entry_name in registry.entries(kind):
                declarations.append(registry.load_class(kind, entry_name))
        if not declarations:
            known = sorted({name for kind in KINDS for name in registry.entries(kind)} | set(CORE_OPTION_GROUPS))
            close = difflib.get_close_matches(group, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise VadError(f"--set {group}.…: no installed plugin registers {group!r}{hint}; see `vad plugins` for what is installed")
        for cls in declarations:
            cls.Options.parse(values, owner=cls.describe_owner())
        if used is not None and not uses_group(group, used, registry):
            raise VadError(
                f"--set {group}.…: this run does not use {group!r}, so the option would have no effect "
                f"({_what_is_used(used)}); choose it for the run, or drop the option"
            )


def _check_source_group(group: str, config: RunConfig, registry: Registry, used_only: bool) -> None:
    """``--set detector:NAME.KEY=VALUE`` sets an option of NAME's feature source: NAME must be an
    installed detector and (``used_only``) ``detector:NAME`` one of the run's backbones. The
    values are checked against the source's declaration when it is built, before the run
    writes anything."""
    registry.get("detectors", group[len(DETECTOR_SOURCE_PREFIX) :])
    if used_only and not uses_group(group, used_components(config, registry), registry):
        raise VadError(
            f"--set {group}.…: sets options of that detector's feature source, and this run does not use it "
            f"(backbones: {', '.join(backbone_specs(config, registry))}); add --backbone {group}, or drop the option"
        )


def _what_is_used(used: dict[str, set[str]]) -> str:
    """A short account of the components a run uses, for messages."""
    kinds = ("detectors", "backbones", "ensemblers", "thresholds", "datasets")
    return "; ".join(f"{kind}: {', '.join(sorted(used[kind]))}" for kind in kinds if used[kind])


# --------------------------------------------------------------------------- from a configuration


def deepest_stride(source: FeatureSource | None) -> int | None:
    """The largest stride among the backbone layers a feature source reads (None: unknown)."""
    if isinstance(source, PatchFeatures):
        strides = {info.name: info.stride for info in source.backbone.feature_info()}
        return max(strides[layer] for layer in source.options.layers)
    if isinstance(source, FeatureEnsembler):
        found = [stride for stride in map(deepest_stride, source.members) if stride is not None]
        return max(found) if found else None
    return None


def detector_options(name: str, config: RunConfig, registry: Registry, geometry: Geometry) -> dict[str, Any]:
    """The options a detector is built with: the user's; for an image detector with its own
    network (a teacher, an encoder) that declares ``backbone`` / ``weights`` / ``pretrained``
    options, the run's one ``--backbone`` (not a ``detector:`` source) / ``--weights`` /
    ``--no-pretrained`` (unless set for it); and for one that declares a square
    ``image_size`` option (DRAEM) the geometry's network input side passed through, so that the
    detector's own rules (DRAEM: a multiple of 32) check it and its saved options say it."""
    options = config.options_for(name)
    cls = registry.load_class("detectors", name)
    if cls.input == "images":
        declared = cls.Options.fields()
        networks = [spec for spec in config.backbones if not spec.startswith(DETECTOR_SOURCE_PREFIX)]
        if len(networks) == 1 and "backbone" in declared:
            options.setdefault("backbone", networks[0])
        if config.weights and "weights" in declared:
            options.setdefault("weights", config.weights)
        if not config.pretrained and "pretrained" in declared:
            options.setdefault("pretrained", False)
    if not geometry.active or cls.input != "images" or "image_size" not in cls.Options.fields():
        return options
    size = geometry.planned_network_size
    if size is None or size[0] != size[1]:
        shape = "rectangular inputs decided at fit (--keep-aspect)" if size is None else f"{size[0]}x{size[1]} inputs"
        raise VadError(
            f"detector {name!r} takes square inputs (its image_size option), but the input geometry gives {shape}; "
            "give --image-size as one number, or a --tile"
        )
    given = options.get("image_size")
    if given is not None and given != size[0]:
        raise VadError(
            f"--set {name}.image_size={given} conflicts with the input geometry's {size[0]} px network input "
            f"({geometry.describe()}); give the size once (--image-size or --tile)"
        )
    return {**options, "image_size": size[0]}


def check_geometry(geometry: Geometry, sources: list[FeatureSource]) -> None:
    """Network inputs at least as large as the deepest feature stride, and of a size each
    backbone can read (:meth:`Backbone.check_input_size`)."""
    if not geometry.active:
        return
    planned = geometry.planned_network_size
    smallest = min(planned) if planned is not None else geometry.image_size[0] if geometry.image_size else None
    for source in sources:
        if planned is not None and isinstance(source, PatchFeatures):
            source.backbone.check_input_size(*planned)
        stride = deepest_stride(source)
        if smallest is not None and stride is not None and smallest < stride:
            what = f"--tile {geometry.tile}" if geometry.tiled else f"the {smallest} px network input"
            raise VadError(
                f"{what} is smaller than the deepest feature stride {stride} of the layers used: "
                f"use network inputs of at least {stride} px (or shallower --layer)"
            )


def build_detector_source(name: str, config: RunConfig, registry: Registry) -> FeatureSource:
    """The FeatureSource of an (unfitted) detector, trained when its ensemble is fitted."""
    detector = create("detectors", name, registry, run_seed=config.seed, **detector_options(name, config, registry, config.geometry()))
    source = detector.feature_source(**config.options_for(DETECTOR_SOURCE_PREFIX + name))
    if source is None:
        raise VadError(f"detector {name!r} offers no feature source, so --backbone {DETECTOR_SOURCE_PREFIX}{name} cannot use it")
    return source


def build_sources(config: RunConfig, registry: Registry) -> list[FeatureSource]:
    """One patch-feature source per backbone (``detector:NAME``: that detector's features)."""
    specs = backbone_specs(config, registry)
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
        sources.append(PatchFeatures(backbone, layers=config.layers, aggregation=config.aggregation, layer_dim=config.layer_dim, target_dim=config.target_dim))
    if not config.pretrained:
        warn("backbones are RANDOMLY INITIALISED (--no-pretrained): scores are not meaningful for comparison")
    return sources


def _ensemblers_of(registry: Registry, kind: type) -> str:
    names = [name for name, entry in sorted(registry.entries("ensemblers").items()) if issubclass(entry.load(), kind)]
    return ", ".join(names) or "none installed"


def check_score_kind(threshold: Any, threshold_name: str, members: list[Any], score_ensemble: str | None) -> None:
    """Refuse a threshold rule that reads a fixed meaning into the scores (``requires_scores``)
    for detectors whose scores do not have it, or for fused scores."""
    wanted = threshold.requires_scores
    if wanted is None:
        return
    if score_ensemble is not None:
        raise VadError(f"--threshold {threshold_name} needs scores that are {wanted}; a score-level ensemble ({score_ensemble}) fuses scores into something else")
    for member in members:
        if member.detector.score_kind != wanted:
            raise VadError(
                f"--threshold {threshold_name} needs scores that are {wanted}, and {member.detector.describe_owner()} gives "
                f"{member.detector.score_kind or 'ordinary anomaly scores'} with these options (see `vad list detectors --details` for a score option)"
            )


def build_model(config: RunConfig, registry: Registry | None = None) -> AnomalyModel:
    """Compose the plugins named in ``config`` into an unfitted :class:`AnomalyModel`."""
    from vad.model import AnomalyModel, Member

    registry = registry or get_registry()
    registry.check()
    check_options(config, registry)
    geometry = config.geometry()
    detector_classes = {name: registry.load_class("detectors", name) for name in config.detectors}
    score_level = is_score_ensembler(config.ensemble, registry)
    needs_features = any(cls.input == "features" for cls in detector_classes.values())
    if config.weights and not needs_features and not any("weights" in cls.Options.fields() for cls in detector_classes.values()):
        raise VadError(f"--weights {config.weights}: no part of this run loads network weights ({', '.join(config.detectors)} learn from the images alone)")
    sources = build_sources(config, registry) if needs_features else []
    if config.ensemble is not None and not score_level:
        sources = [create("ensemblers", config.ensemble, registry, sources, run_seed=config.seed, **config.options_for(config.ensemble))]
    if not score_level and (len(config.detectors) > 1 or len(sources) > 1):
        raise VadError(
            "several detectors or backbones need an ensemble: feature-level ensemblers fuse backbones' features "
            f"({_ensemblers_of(registry, FeatureEnsembler)}); score-level ensemblers fuse detectors' scores "
            f"({_ensemblers_of(registry, ScoreEnsembler)})"
        )
    check_geometry(geometry, sources)
    members = []
    for name, cls in detector_classes.items():
        for source in sources if cls.input == "features" else [None]:
            detector = create("detectors", name, registry, run_seed=config.seed, **detector_options(name, config, registry, geometry))
            members.append(Member(name, detector, source))
    if score_level and len(members) < 2:
        raise VadError(f"--ensemble {config.ensemble} fuses several members; give two or more --detector or --backbone")
    ensembler = create("ensemblers", config.ensemble, registry, run_seed=config.seed, **config.options_for(config.ensemble)) if score_level else None
    threshold = create("thresholds", config.threshold, registry, run_seed=config.seed, **config.options_for(config.threshold))
    check_score_kind(threshold, config.threshold, members, config.ensemble if score_level else None)
    return AnomalyModel(
        members,
        ensembler=ensembler,
        ensembler_name=config.ensemble if score_level else None,
        threshold=threshold,
        threshold_name=config.threshold,
        sigma=config.sigma,
        batch_size=config.batch_size,
        skip_bad=config.skip_bad,
        seed=config.seed,
        calibration_method=config.calibration,
        folds=config.folds,
        holdout_fraction=config.holdout_fraction,
        geometry=geometry,
    )


def create_dataset(config: RunConfig, registry: Registry) -> Dataset:
    """The data set plugin with the run's root, validation fraction, seed and skip-bad policy."""
    options = {"validation_fraction": config.validation_fraction, "seed": config.seed, "skip_bad": config.skip_bad}
    return registry.load_class("datasets", config.dataset)(root=config.root, **{**options, **config.options_for(config.dataset)})


# --------------------------------------------------------------------------- to and from model.json


def source_from_config(config: dict[str, Any], registry: Registry | None = None) -> FeatureSource:
    """Rebuild an unfitted FeatureSource from its ``config()`` (see the module docstring)."""
    registry = registry or get_registry()
    kind, hparams = config["kind"], dict(config["hparams"])
    if kind == PatchFeatures.name:
        backbone = hparams.pop("backbone")
        return PatchFeatures(create_backbone(backbone["spec"], registry, **backbone["hparams"]), **hparams)
    if kind == DetectorFeatures.kind:
        detector = registry.load_class("detectors", config["detector"])(**hparams.pop("detector"))
        return detector.feature_source(**hparams)
    members = [source_from_config(member, registry) for member in hparams.pop("members")]
    return registry.load_class("ensemblers", kind)(members, **hparams)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _provenance(registry: Registry, kind: str, name: str) -> dict[str, Any]:
    entry = registry.entries(kind).get(name)
    if entry is None:
        return {"plugin": None, "distribution": None, "version": None}
    return {"plugin": entry.plugin.name, "distribution": entry.plugin.distribution, "version": entry.plugin.version}


def model_document(model: AnomalyModel, registry: Registry | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``model.json``'s content and the tensors of a fitted model."""
    registry = registry or get_registry()
    tensors: dict[str, torch.Tensor] = {}
    members = []
    for index, member in enumerate(model.members):
        detector_state = member.detector.state()
        tensors.update(artifacts.prefixed(f"member{index}/detector", detector_state.tensors))
        entry: dict[str, Any] = {
            "detector": {
                "name": member.detector_name,
                **_provenance(registry, "detectors", member.detector_name),
                "hparams": _json_safe(member.detector.hparams),
                "meta": _json_safe(detector_state.meta),
            },
            "preprocessing": member.preprocessing.to_dict(),
        }
        if member.source is not None:
            source_state = member.source.state()
            tensors.update(artifacts.prefixed(f"member{index}/source", source_state.tensors))
            entry["source"] = {**_json_safe(member.source.config()), "meta": _json_safe(source_state.meta)}
        members.append(entry)
    document: dict[str, Any] = {
        "vad_version": vad.__version__,
        "members": members,
        "postprocess": {"sigma": model.sigma},
        **({"geometry": model.geometry.to_dict()} if model.geometry.active else {}),
        "threshold": {
            "name": model.threshold_name,
            "options": model.threshold.hparams if model.threshold is not None else {},
            "image": model.image_threshold,
            "pixel": model.pixel_threshold,
        },
        "calibration": _json_safe(model.calibration),
        "seed": model.seed,
        "batch_size": model.batch_size,
    }
    for name, part in (("roi", model.roi), ("registration", model.registration)):
        if part is not None:
            document[name], part_tensors = part.to_document()
            tensors.update(part_tensors)
    if model.ensembler is not None:
        state = model.ensembler.state()
        tensors.update(artifacts.prefixed("ensembler", state.tensors))
        document["ensembler"] = {
            "name": model.ensembler_name,
            **_provenance(registry, "ensemblers", model.ensembler_name or ""),
            "options": model.ensembler.hparams,
            "meta": _json_safe(state.meta),
        }
    return document, tensors


def model_from_document(document: dict[str, Any], tensors: dict[str, torch.Tensor], registry: Registry | None = None) -> AnomalyModel:
    """The fitted model :func:`model_document` described (nothing is refitted)."""
    from vad.model import AnomalyModel, Member

    registry = registry or get_registry()
    members = []
    for index, entry in enumerate(document["members"]):
        info = entry["detector"]
        detector = _rebuilt("detectors", info["name"], registry, info["hparams"])
        detector.load_state(State(info.get("meta", {}), artifacts.unprefixed(f"member{index}/detector", tensors)))
        source = None
        if "source" in entry:
            source = source_from_config(entry["source"], registry)
            source.load_state(State(entry["source"].get("meta", {}), artifacts.unprefixed(f"member{index}/source", tensors)))
        members.append(Member(info["name"], detector, source))
    ensembler = None
    ensembler_info = document.get("ensembler")
    if ensembler_info:
        ensembler = _rebuilt("ensemblers", ensembler_info["name"], registry, ensembler_info["options"])
        ensembler.load_state(State(ensembler_info.get("meta", {}), artifacts.unprefixed("ensembler", tensors)))
    threshold_info = document.get("threshold", {})
    threshold = None
    if threshold_info.get("name"):
        threshold = _rebuilt("thresholds", threshold_info["name"], registry, threshold_info.get("options", {}))
    return AnomalyModel(
        members,
        ensembler=ensembler,
        ensembler_name=ensembler_info["name"] if ensembler_info else None,
        threshold=threshold,
        threshold_name=threshold_info.get("name"),
        sigma=document.get("postprocess", {}).get("sigma", 4.0),
        batch_size=document.get("batch_size", 8),
        seed=document.get("seed", 0),
        image_threshold=threshold_info.get("image"),
        pixel_threshold=threshold_info.get("pixel"),
        calibration=document.get("calibration", {}),
        geometry=Geometry.from_dict(document.get("geometry")),  # absent (older folders): as before
        roi=Roi.from_document(document.get("roi"), tensors),
        registration=Registration.from_document(document.get("registration"), tensors),
    )


def _rebuilt(kind: str, name: str, registry: Registry, hparams: dict[str, Any]) -> Any:
    """A saved component rebuilt from its hparams; a plugin missing now is a clear error."""
    try:
        cls = registry.load_class(kind, name)
    except UnknownNameError as error:
        raise VadError(f"this model needs the {kind[:-1]} {name!r}, which no installed plugin registers: {error}") from error
    return cls(**hparams)
