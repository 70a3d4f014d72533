"""A fitted anomaly model: feature sources + detectors (+ a score ensembler) + thresholds.

This module composes plugins; it holds no method. :class:`AnomalyModel` fits on training
samples, chooses thresholds on validation samples, predicts maps at each image's original
resolution and saves itself as a model folder (``model.json`` + ``tensors.safetensors``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vad import artifacts
from vad.contracts import Detector, FeatureSource, Prediction, Preprocessing, Sample, ScoreEnsembler, Threshold
from vad.errors import VadError
from vad.images import BadImageError
from vad.plugins import Registry
from vad.postprocess import postprocess_maps
from vad.preprocess import to_batch
from vad.progress import track, warn
from vad.training import CachedBatches, member_session

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
    """Re-iterable feature grids of image batches (one backbone pass per iteration)."""

    def __init__(self, images: Iterable[torch.Tensor], source: FeatureSource) -> None:
        self.images, self.source = images, source

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.images:
            with torch.inference_mode():
                features = self.source(batch)
            yield features.clone()  # usable outside inference mode (training heads)


def _thresholds_where(keep: Callable[[type], bool]) -> str:
    """The registered threshold rules whose class ``keep`` accepts, for messages."""
    from vad.plugins import get_registry

    entries = get_registry().entries("thresholds")
    return ", ".join(name for name, entry in sorted(entries.items()) if keep(entry.load())) or "none installed"


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
            raise VadError("several detectors need a score-level ensemble (--ensemble NAME; `vad list ensemblers --details` says each one's level)")

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
        for index, member in enumerate(self.members):
            seed_everything(self.seed)
            images = ImageBatches(train, member.preprocessing, self.batch_size, self.device, f"fit {member.detector_name}", self.skip_bad)
            with member_session(f"member{index}"):
                if member.source is not None and member.source.requires_fit:
                    with member_session("source"):
                        member.source.fit(images)
                inputs: Iterable[torch.Tensor] = images if member.source is None else SourceBatches(images, member.source)
                member.detector.fit(CachedBatches(inputs) if member.detector.training_passes > 1 else inputs)
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
            if self.threshold.needs_validation:
                raise VadError(
                    "no validation images to fit the threshold on: raise --validation-fraction above 0, or use a "
                    f"threshold that needs none ({_thresholds_where(lambda cls: not cls.needs_validation)})"
                )
            empty = np.zeros(0)
            self.image_threshold = self.pixel_threshold = float(self.threshold.fit(empty, empty.astype(np.int64)))
            return
        labels = np.array([s.label for s in validation])
        if self.threshold.needs_anomalous and not labels.any():
            raise VadError(
                f"threshold {self.threshold_name!r} needs anomalous validation images, but the validation "
                "split holds only normal images; use a threshold that fits normal-only data "
                f"({_thresholds_where(lambda cls: not cls.needs_anomalous)})"
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

    def save(self, folder: str | Path, registry: Registry | None = None) -> Path:
        """Write the model folder atomically (``model.json`` + ``tensors.safetensors``)."""
        from vad.build import model_document

        document, tensors = model_document(self, registry)
        return artifacts.write_model_folder(folder, document, tensors)

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", registry: Registry | None = None) -> AnomalyModel:
        """Rebuild a saved model (plugins must be installed); nothing is refitted."""
        from vad.build import model_from_document

        document, tensors = artifacts.read_model_folder(folder)
        return model_from_document(document, tensors, registry).to(torch.device(device))
