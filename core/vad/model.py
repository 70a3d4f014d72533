"""A fitted anomaly model: feature sources + detectors (+ a score ensembler) + thresholds.

This module composes plugins; it holds no method. :class:`AnomalyModel` fits on training
samples, chooses thresholds on validation samples, predicts maps at each image's original
resolution and saves itself as a model folder (``model.json`` + ``tensors.safetensors``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vad
from vad import artifacts
from vad.contracts import (
    Backbone,
    Detector,
    FeatureSource,
    Prediction,
    Preprocessing,
    Sample,
    ScoreEnsembler,
    State,
    Threshold,
)
from vad.errors import VadError
from vad.images import BadImageError
from vad.plugins import Registry, get_registry
from vad.postprocess import postprocess_maps
from vad.preprocess import to_batch
from vad.progress import track, warn

#: Inputs cached between training passes of multi-pass detectors, at most this many bytes.
FEATURE_CACHE_BYTES = 1 << 30
#: Validation pixels used to fit a pixel threshold, at most (sampled with the run's seed).
MAX_THRESHOLD_PIXELS = 2_000_000


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels where cheap."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cpu``; ``cuda`` / ``cuda:N`` (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise VadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise VadError(f"device {device!r} asked for, but this torch has no CUDA device; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise VadError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    elif resolved.type != "cpu":
        raise VadError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


# --------------------------------------------------------------------------- building


def create_backbone(spec: str, registry: Registry | None = None, **options: Any) -> Backbone:
    """``--backbone SPEC``: a registered name (``cls(SPEC)``) or ``family:model`` (``cls(model)``)."""
    registry = registry or get_registry()
    table = registry.entries("backbones")
    if spec in table or ":" not in spec:
        cls, model_name = registry.load_class("backbones", spec), spec
    else:
        family, _, model_name = spec.partition(":")
        cls = registry.load_class("backbones", family)
    backbone = cls(model_name, **options)
    backbone.spec = spec
    return backbone


def build_feature_source(config: dict[str, Any], registry: Registry | None = None) -> FeatureSource:
    """Rebuild a FeatureSource from its ``config()`` (patch features or a feature ensemble)."""
    from vad.features import PatchFeatures

    registry = registry or get_registry()
    kind, hparams = config["kind"], dict(config["hparams"])
    if kind == PatchFeatures.name:
        backbone_config = hparams.pop("backbone")
        backbone = create_backbone(backbone_config["spec"], registry, **backbone_config["hparams"])
        return PatchFeatures(backbone, **hparams)
    if kind == "detector-features":  # a trained detector's internals (DRAEM's encoder, ...)
        detector = registry.load_class("detectors", config["detector"])(**hparams.pop("detector"))
        return detector.feature_source(**hparams)
    members = [build_feature_source(member, registry) for member in hparams.pop("members")]
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


# --------------------------------------------------------------------------- data flow


@dataclass
class SkippedImage:
    """An image left out because it could not be decoded (``--skip-bad``)."""

    path: str
    reason: str


def load_images(samples: Sequence[Sample], skip_bad: bool, skipped: list[SkippedImage]) -> tuple[list[Sample], list[np.ndarray]]:
    """Decode a batch; bad files stop the run, or are listed in ``skipped`` with ``skip_bad``."""
    kept, images = [], []
    for sample in samples:
        try:
            images.append(sample.load_image())
        except BadImageError as error:
            if not skip_bad:
                raise VadError(f"{error} (pass --skip-bad to skip unreadable images and list them)") from error
            skipped.append(SkippedImage(sample.path, str(error)))
            continue
        kept.append(sample)
    return kept, images


class ImageBatches:
    """Re-iterable preprocessed image batches of a sample list (one decode per pass)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessing: Preprocessing,
        batch_size: int,
        device: torch.device,
        description: str,
        skip_bad: bool = False,
    ) -> None:
        self.samples, self.preprocessing, self.batch_size = list(samples), preprocessing, batch_size
        self.device, self.description, self.skip_bad = device, description, skip_bad
        self.skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.skipped = []
        starts = range(0, len(self.samples), self.batch_size)
        for start in track(starts, self.description):
            kept, images = load_images(self.samples[start : start + self.batch_size], self.skip_bad, self.skipped)
            if images:
                yield to_batch(images, self.preprocessing, self.device)


class SourceBatches:
    """Re-iterable feature grids of image batches; cached in memory for multi-pass detectors."""

    def __init__(self, images: Iterable[torch.Tensor], source: FeatureSource, cache: bool) -> None:
        self.images, self.source, self.cache = images, source, cache
        self._cached: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._cached is not None:
            yield from self._cached
            return
        collected: list[torch.Tensor] | None = [] if self.cache else None
        used = 0
        for batch in self.images:
            with torch.inference_mode():
                features = self.source(batch)
            features = features.clone()  # usable outside inference mode (training heads)
            if collected is not None:
                used += features.numel() * features.element_size()
                collected = collected + [features] if used <= FEATURE_CACHE_BYTES else None
            yield features
        self._cached = collected


# --------------------------------------------------------------------------- the model


@dataclass
class Member:
    """One detector with its feature source (None when the detector reads images)."""

    detector_name: str
    detector: Detector
    source: FeatureSource | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        """What this member's images must look like."""
        if self.source is not None:
            return self.source.preprocessing
        if self.detector.preprocessing is None:
            raise VadError(f"detector {self.detector_name!r} reads images but states no preprocessing")
        return self.detector.preprocessing

    def predict(self, images: torch.Tensor) -> Prediction:
        """Scores and grid maps for one preprocessed batch."""
        with torch.inference_mode():
            inputs = self.source(images) if self.source is not None else images
            return self.detector.predict(inputs)


@dataclass
class Output:
    """What the model says about one image: raw score, decision, map at original size."""

    sample: Sample
    score: float
    anomalous: bool | None
    map: np.ndarray | None


@dataclass
class AnomalyModel:
    """Members (+ a score ensembler), thresholds and post-processing, fitted together."""

    members: list[Member]
    ensembler: ScoreEnsembler | None = None
    ensembler_name: str | None = None
    threshold: Threshold | None = None
    threshold_name: str | None = None
    sigma: float = 4.0
    batch_size: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    skip_bad: bool = False
    seed: int = 0
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    skipped: list[SkippedImage] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            raise VadError("a model needs at least one detector")
        if len(self.members) > 1 and self.ensembler is None:
            raise VadError("several detectors need a score-level ensemble (--ensemble score-mean, ...)")

    @property
    def produces_maps(self) -> bool:
        """True when every member produces anomaly maps."""
        return all(member.detector.produces_maps for member in self.members)

    def to(self, device: torch.device) -> AnomalyModel:
        """Move every component to ``device``."""
        self.device = device
        for member in self.members:
            member.detector.to(device)
            if member.source is not None:
                member.source.to(device)
        return self

    # ------------------------------------------------------------------ fit

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample]) -> None:
        """Fit sources and detectors on ``train``, then thresholds (and calibration) on ``validation``."""
        if not train:
            raise VadError("the training set is empty: a detector needs normal training images")
        start = time.perf_counter()
        for member in self.members:
            seed_everything(self.seed)
            images = ImageBatches(train, member.preprocessing, self.batch_size, self.device, f"fit {member.detector_name}", self.skip_bad)
            if member.source is not None:
                if member.source.requires_fit:
                    member.source.fit(images)
                passes = getattr(member.detector, "training_passes", 1)
                member.detector.fit(SourceBatches(images, member.source, cache=passes > 1))
            else:
                member.detector.fit(images)
            self.skipped.extend(images.skipped)
        self.timings["fit_seconds"] = time.perf_counter() - start
        self._fit_thresholds(validation)

    def _fit_thresholds(self, validation: Sequence[Sample]) -> None:
        if self.ensembler is not None:
            if not validation:
                raise VadError("a score-level ensemble is calibrated on validation normals, but the validation split is empty")
            per_member = [self._predict_member_all(member, validation) for member in self.members]
            self.ensembler.calibrate(per_member)
        if self.threshold is None:
            return
        if not validation:
            raise VadError(
                "no validation images to fit the threshold on: raise --validation-fraction above 0, "
                "or use --threshold manual --set manual.value=…"
            )
        labels = np.array([s.label for s in validation])
        if self.threshold.needs_anomalous and not labels.any():
            raise VadError(
                f"threshold {self.threshold_name!r} needs anomalous validation images, but the validation "
                "split holds only normal images; use a threshold that fits normal-only data "
                "(max, quantile, k-sigma) or manual"
            )
        scores, pixel_values, pixel_labels = [], [], []
        rng = np.random.default_rng(self.seed)
        per_image = max(1, MAX_THRESHOLD_PIXELS // max(1, len(validation)))
        for output in self.predict(validation, description="validation"):
            scores.append(output.score)
            if output.map is not None:
                values = output.map.ravel()
                mask = output.sample.load_mask()
                truth = np.zeros(values.shape, bool) if mask is None else mask.ravel()
                if values.size > per_image:
                    pick = rng.choice(values.size, per_image, replace=False)
                    values, truth = values[pick], truth[pick]
                pixel_values.append(values)
                pixel_labels.append(truth)
        self.image_threshold = float(self.threshold.fit(np.asarray(scores), labels[: len(scores)]))
        if pixel_values:
            values, truth = np.concatenate(pixel_values), np.concatenate(pixel_labels)
            if self.threshold.needs_anomalous and not truth.any():
                self.pixel_threshold = None
                warn("no anomalous validation pixels: pixel-level decisions (IoU) are left out")
            else:
                self.pixel_threshold = float(self.threshold.fit(values, truth.astype(np.int64)))

    # ------------------------------------------------------------------ predict

    def _predict_member_all(self, member: Member, samples: Sequence[Sample]) -> Prediction:
        scores, maps = [], []
        for batch in ImageBatches(samples, member.preprocessing, self.batch_size, self.device, f"calibrate {member.detector_name}", self.skip_bad):
            prediction = member.predict(batch)
            scores.append(prediction.scores)
            if prediction.maps is not None:
                maps.append(prediction.maps)
        return Prediction(torch.cat(scores), torch.cat(maps) if maps else None)

    def predict(self, samples: Sequence[Sample], description: str = "predict") -> Iterator[Output]:
        """Score every sample; maps come back at each image's original resolution."""
        reference = self.members[0].preprocessing
        for start in track(range(0, len(samples), self.batch_size), description):
            kept, images = load_images(samples[start : start + self.batch_size], self.skip_bad, self.skipped)
            if not images:
                continue
            batches = {}
            predictions = []
            for member in self.members:
                key = member.preprocessing
                if key not in batches:
                    batches[key] = to_batch(images, key, self.device)
                predictions.append(member.predict(batches[key]))
            prediction = self.ensembler.combine(predictions) if self.ensembler is not None else predictions[0]
            maps = None
            if prediction.maps is not None:
                maps = postprocess_maps(prediction.maps, reference, [image.shape[:2] for image in images], self.sigma)
            scores = prediction.scores.detach().float().cpu().numpy()
            for index, sample in enumerate(kept):
                score = float(scores[index])
                decision = None if self.image_threshold is None else bool(score >= self.image_threshold)
                yield Output(sample, score, decision, None if maps is None else maps[index])

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | Path, registry: Registry | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Write the model folder atomically (``model.json`` + ``tensors.safetensors``)."""
        registry = registry or get_registry()
        tensors: dict[str, torch.Tensor] = {}
        members_json = []
        for index, member in enumerate(self.members):
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
            members_json.append(entry)
        document: dict[str, Any] = {
            "vad_version": vad.__version__,
            "members": members_json,
            "postprocess": {"sigma": self.sigma},
            "threshold": {
                "name": self.threshold_name,
                "options": _json_safe(self.threshold.options) if self.threshold is not None else {},
                "image": self.image_threshold,
                "pixel": self.pixel_threshold,
            },
            "seed": self.seed,
            "batch_size": self.batch_size,
        }
        if self.ensembler is not None:
            state = self.ensembler.state()
            tensors.update(artifacts.prefixed("ensembler", state.tensors))
            document["ensembler"] = {
                "name": self.ensembler_name,
                **_provenance(registry, "ensemblers", self.ensembler_name or ""),
                "options": _json_safe(self.ensembler.options),
                "meta": _json_safe(state.meta),
            }
        if extra:
            document.update(_json_safe(extra))
        return artifacts.write_model_folder(folder, document, tensors)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", registry: Registry | None = None) -> AnomalyModel:
        """Rebuild a saved model (plugins must be installed); nothing is refitted."""
        registry = registry or get_registry()
        document, tensors = artifacts.read_model_folder(folder)
        members = []
        for index, entry in enumerate(document["members"]):
            info = entry["detector"]
            detector = registry.load_class("detectors", info["name"])(**info["hparams"])
            detector.load_state(State(info.get("meta", {}), artifacts.unprefixed(f"member{index}/detector", tensors)))
            source = None
            if "source" in entry:
                source = build_feature_source(entry["source"], registry)
                source.load_state(State(entry["source"].get("meta", {}), artifacts.unprefixed(f"member{index}/source", tensors)))
            members.append(Member(info["name"], detector, source))
        ensembler = None
        ensembler_info = document.get("ensembler")
        if ensembler_info:
            ensembler = registry.load_class("ensemblers", ensembler_info["name"])(**ensembler_info["options"])
            ensembler.load_state(State(ensembler_info.get("meta", {}), artifacts.unprefixed("ensembler", tensors)))
        threshold_info = document.get("threshold", {})
        threshold = None
        if threshold_info.get("name"):
            threshold = registry.load_class("thresholds", threshold_info["name"])(**threshold_info.get("options", {}))
        model = cls(
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
        )
        return model.to(torch.device(device))
