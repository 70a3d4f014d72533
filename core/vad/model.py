"""A fitted anomaly model: feature sources + detectors (+ a score ensembler) + thresholds.

This module composes plugins; it holds no method. :class:`AnomalyModel` fits on training
samples, chooses thresholds on validation samples, predicts maps at each image's original
resolution and saves itself as a model folder (``model.json`` + ``tensors.safetensors``).

The model's :class:`~vad.geometry.Geometry` (``--image-size``, ``--resize/--center-crop``,
``--keep-aspect``, ``--tile``) applies to every member alike: it replaces each member's input
size, and with tiles the members fit on and score tiles, whose maps are stitched into one map
per image before thresholds, ensembles and post-processing see them.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vad import artifacts
from vad.contracts import Detector, FeatureSource, Prediction, Preprocessing, Sample, ScoreEnsembler, Threshold
from vad.errors import DamagedModelError, UnknownNameError, VadError
from vad.options import OptionError
from vad.geometry import Geometry
from vad.images import BadImageError
from vad.plugins import Registry
from vad.postprocess import upsample_and_blur, working_to_original
from vad.preprocess import to_batch
from vad.progress import info, track, warn
from vad.registration import Alignment, Registration
from vad.roi import Roi
from vad.calibration import METHODS as CALIBRATIONS
from vad.calibration import false_alarm_estimate, fold_of, split_hold_out
from vad.features import SourceBatches
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


def load_images(
    samples: Sequence[Sample],
    skip_bad: bool,
    skipped: list[SkippedImage],
    roi: Roi | None = None,
    registration: Registration | None = None,
    alignments: list[Alignment] | None = None,
) -> tuple[list[Sample], list[np.ndarray]]:
    """Decode a batch; bad files stop the run, or are listed in ``skipped`` with ``skip_bad``.
    With a ``registration``, each image is aligned to its reference (each image's alignment
    appended to ``alignments``); with an ``roi``, every image must have its size, and ``before``
    mode paints outside it."""
    kept, images = [], []
    for sample in samples:
        try:
            image = sample.load_image()
        except BadImageError as error:
            if not skip_bad:
                raise VadError(f"{error} (pass --skip-bad to skip unreadable images and list them)") from error
            skipped.append(SkippedImage(sample.path, str(error)))
            continue
        if registration is not None:
            registration.check_image(image.shape, sample.path)
            image, alignment = registration.align(image)
            if alignments is not None:
                alignments.append(alignment)
        if roi is not None:
            roi.check_image(image.shape, sample.path)
            if roi.mode == "before":
                image = roi.paint(image)
        images.append(image)
        kept.append(sample)
    return kept, images


def network_inputs(
    samples: Sequence[Sample], images: Sequence[np.ndarray], preprocessing: Preprocessing, geometry: Geometry, device: torch.device | str
) -> torch.Tensor:
    """Decoded images -> what a member sees: resized, cropped and normalised as ``preprocessing``
    (the member's, with ``geometry`` applied) says, then cut into tiles when ``geometry`` tiles
    (``[B * tiles, 3, tile, tile]``, image after image)."""
    for sample, image in zip(samples, images):
        geometry.check_image(image.shape[:2], sample.path)
    batch = to_batch(images, preprocessing, device)
    layout = geometry.layout()
    return batch if layout is None else layout.cut(batch)


class ImageBatches:
    """Re-iterable preprocessed image batches of a sample list (one decode per pass); with a
    tiling ``geometry``, each batch holds the tiles of ``batch_size`` images."""

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocessing: Preprocessing,
        batch_size: int,
        device: torch.device,
        description: str,
        skip_bad: bool = False,
        geometry: Geometry | None = None,
        roi: Roi | None = None,
        registration: Registration | None = None,
    ) -> None:
        self.samples, self.preprocessing, self.batch_size = list(samples), preprocessing, batch_size
        self.device, self.description, self.skip_bad = device, description, skip_bad
        self.geometry = geometry or Geometry()
        self.roi, self.registration = roi, registration
        self.skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        """Batches per pass (all images readable)."""
        layout = self.geometry.layout()
        per_image = 1 if layout is None else layout.count
        full, rest = divmod(len(self.samples), self.batch_size)
        return full * per_image + -(-rest * per_image // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.skipped = []
        starts = range(0, len(self.samples), self.batch_size)
        for start in track(starts, self.description):
            kept, images = load_images(self.samples[start : start + self.batch_size], self.skip_bad, self.skipped, self.roi, self.registration)
            if images:
                inputs = network_inputs(kept, images, self.preprocessing, self.geometry, self.device)
                for first in range(0, len(inputs), self.batch_size):  # tiles: batch_size at a time
                    yield inputs[first : first + self.batch_size]


def _concatenated(predictions: list[Prediction]) -> Prediction:
    """One Prediction of several batches' (in order)."""
    maps = [p.maps for p in predictions]
    return Prediction(torch.cat([p.scores for p in predictions]), None if any(m is None for m in maps) else torch.cat(maps))


def _rows(prediction: Prediction, keep: torch.Tensor) -> Prediction:
    """The images of ``prediction`` where the boolean ``keep`` is True."""
    return Prediction(prediction.scores[keep], None if prediction.maps is None else prediction.maps[keep])


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

    def predict(self, images: torch.Tensor, left_out: torch.Tensor | None = None) -> Prediction:
        """Scores and grid maps for one preprocessed batch; with ``left_out`` (the images'
        positions among the training images) each training image as if left out of fit."""
        with torch.inference_mode():
            inputs = self.source(images) if self.source is not None else images
            return self.detector.predict(inputs) if left_out is None else self.detector.predict_left_out(inputs, left_out)

    def fresh(self) -> Member:
        """An unfitted copy with the same options (a source that learns is copied too)."""
        from vad.build import source_from_config

        source = self.source
        if source is not None and source.requires_fit:
            source = source_from_config(source.config()).to(source.device)
        return Member(self.detector_name, type(self.detector)(**self.detector.hparams).to(self.detector.device), source)


@dataclass
class Scored:
    """Samples with their original sizes and each member's predictions on them, in order (per
    tile, image after image, with a tiling geometry: stitched only when used, to keep memory low)."""

    samples: list[Sample]
    sizes: list[tuple[int, int]]
    predictions: list[Prediction]
    #: Each member's predictions on synthetic anomalies made from ``samples`` (for a score
    #: ensemble that learns from anomalies; image-level), else None.
    anomalous: list[Prediction] | None = None


@dataclass
class Output:
    """What the model says about one image: raw score, decision, map at original size."""

    sample: Sample
    score: float
    anomalous: bool | None
    map: np.ndarray | None
    #: Why the image was scored as it is although the model aligns images (its registration failed), else None.
    registration_error: str | None = None


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
    #: How the calibration scores are obtained (:mod:`vad.calibration`): auto, leave-one-out,
    #: cross-fit or hold-out; ``folds`` for cross-fit, ``holdout_fraction`` for hold-out.
    calibration_method: str = "auto"
    folds: int = 5
    holdout_fraction: float = 0.2
    #: What calibration did: method, number of normal scores, the image threshold's expected
    #: false-alarm rate with its interval (saved with the model, shown in the report).
    calibration: dict[str, Any] = field(default_factory=dict)
    #: The normal calibration images' scores the image threshold was fitted on (after ``fit``;
    #: not saved), so other rules can be compared on the same scores.
    normal_calibration_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    #: The input geometry of every member (:mod:`vad.geometry`); empty: each member's own
    #: preprocessing. ``fit`` decides what depends on the training images (``fit_size``).
    geometry: Geometry = field(default_factory=Geometry)
    #: The region of interest (:mod:`vad.roi`), or None: every pixel is inspected.
    roi: Roi | None = None
    #: Alignment of every image to a reference view (:mod:`vad.registration`), or None.
    registration: Registration | None = None
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

    def input_preprocessing(self, member: Member) -> Preprocessing:
        """What ``member``'s images are turned into before tiling: its own preprocessing with
        the model's geometry applied (the working size, resize and crop)."""
        return self.geometry.preprocessing(member.preprocessing)

    def to(self, device: torch.device) -> AnomalyModel:
        """Move every component to ``device``."""
        self.device = device
        for member in self.members:
            member.detector.to(device)
            if member.source is not None:
                member.source.to(device)
        return self

    # ------------------------------------------------------------------ fit

    def fit(self, train: Sequence[Sample], validation: Sequence[Sample] = ()) -> None:
        """Fit sources and detectors, then thresholds (and a score ensemble's calibration) on
        normal scores the detectors have not seen (see :mod:`vad.calibration`): the held-out
        ``validation`` samples when given, else as ``calibration_method`` says."""
        if not train:
            raise VadError("the training set is empty: a detector needs normal training images")
        self._resolve_geometry(train)
        if not self.needs_calibration:
            self._fit_members(self.members, [*train, *validation])  # nothing to calibrate: every image trains
            self.calibration = {"method": "none", "scores": 0}
            if self.threshold is not None:
                empty = np.zeros(0)
                self.image_threshold = self.pixel_threshold = float(self.threshold.fit(empty, empty.astype(np.int64)))
            return
        self.check_calibration(len(train), len(validation))
        method = self.resolve_calibration(bool(validation), len(train))
        if method == "hold-out" and not validation:
            train, validation = split_hold_out(train, self.holdout_fraction, self.seed)
        start = time.perf_counter()
        self._fit_members(self.members, train)
        self.timings["fit_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        synthetic = torch.Generator().manual_seed(self.seed) if self.ensembler is not None and self.ensembler.learns_from_anomalies else None
        if method == "hold-out":
            scored = self._member_predictions(self.members, validation, "calibrate", synthetic=synthetic)
        elif method == "leave-one-out":
            scored = self._member_predictions(self.members, train, "left out", left_out=True, synthetic=synthetic)
        else:
            scored = self._cross_fit_predictions(train, synthetic)
        self.timings["calibration_seconds"] = time.perf_counter() - start
        self._fit_thresholds(scored, method)

    def _resolve_geometry(self, train: Sequence[Sample]) -> None:
        """Decide what the geometry takes from the training images (``fit_size``: the first
        readable training image's size) and say what the members will see."""
        if not self.geometry.active:
            return
        for sample in train:
            _, images = load_images([sample], self.skip_bad, [])
            if images:
                self.geometry = dataclasses.replace(self.geometry, fit_size=None).resolved(images[0].shape[:2])
                info(f"input geometry: {self.geometry.describe()}")
                return

    @property
    def needs_calibration(self) -> bool:
        """True when thresholds or a score ensemble need normal scores the detectors have not seen."""
        return self.ensembler is not None or (self.threshold is not None and self.threshold.needs_validation)

    def check_calibration(self, train_count: int, validation_count: int) -> None:
        """A clear error, before anything is fitted, when the calibration cannot get scores the
        detectors have not seen from ``train_count`` training (and ``validation_count``
        validation) images; what to do instead."""
        if not self.needs_calibration:
            return
        what = f"the score ensemble {self.ensembler_name!r}" if self.ensembler is not None else f"the {self.threshold_name!r} threshold"
        instead = (
            "" if self.ensembler is not None
            else "; or use a fixed threshold, which needs no calibration: --threshold manual --set manual.value=SCORE"
        )
        method = "hold-out" if validation_count else self.resolve_calibration(False, train_count)
        needed = self.folds if method == "cross-fit" else 2
        if not validation_count and train_count < needed:
            raise VadError(
                f"{train_count} training image(s): calibrating {what} needs normal scores the detector has not seen, "
                f"and {method} calibration needs at least {needed} training images. Add normal training images{instead}"
            )
        held_out = min(train_count - 1, max(1, round(train_count * self.holdout_fraction)))
        scores = validation_count or (held_out if method == "hold-out" else train_count)
        least = self.threshold.min_scores if self.threshold is not None else 1
        if scores < least:
            raise VadError(
                f"{method} calibration gives {scores} normal score(s), and {what} needs at least {least}. "
                f"Add normal training images (or validation images){instead}"
            )

    def resolve_calibration(self, has_validation: bool, train_count: int | None = None) -> str:
        """The calibration method ``auto`` stands for with these members (module docstring of
        :mod:`vad.calibration`); checks that an explicit one is possible. ``auto`` cross-fits
        only with at least ``folds`` training images (else it holds images out).

        With tiles, the detectors' training "images" are tiles and leave-one-out leaves one
        tile out. Overlapping tiles share pixels, so a tile left out would still be seen through
        its neighbours: ``auto`` then cross-fits (folds over images, never splitting an image's
        tiles) or holds images out, and an explicit leave-one-out is refused."""
        method = self.calibration_method
        if method not in CALIBRATIONS:
            raise VadError(f"unknown calibration {method!r}; choose one of {', '.join(CALIBRATIONS)}")
        if has_validation and method in ("auto", "hold-out"):
            return "hold-out"
        def left_out(member: Member) -> bool:
            return member.detector.leave_one_out and (member.source is None or member.source.leave_one_out)

        every_left_out = all(left_out(member) for member in self.members)
        if method == "leave-one-out" and not every_left_out:
            names = [m.detector_name + (" (on a trained detector's features)" if m.detector.leave_one_out else "") for m in self.members if not left_out(m)]
            raise VadError(f"calibration leave-one-out: {', '.join(names)} cannot score training images as left out; use cross-fit or hold-out")
        overlapping = self.geometry.overlapping
        if method == "leave-one-out" and overlapping:
            raise VadError(
                f"calibration leave-one-out leaves one tile out, but the tiles overlap ({self.geometry.describe()}; the last "
                "row and column are aligned to the border): a left-out tile's pixels stay in its neighbours and its "
                "scores would be too low; use cross-fit (folds over images) or hold-out, or tiles that do not overlap"
            )
        if method != "auto":
            return method
        if every_left_out and not overlapping:
            return "leave-one-out"
        single_pass = all(
            m.detector.cheap_to_refit and m.detector.training_passes == 1 and (m.source is None or not m.source.requires_fit) for m in self.members
        )
        enough_for_folds = train_count is None or train_count >= self.folds
        return "cross-fit" if single_pass and enough_for_folds else "hold-out"

    def _fit_members(self, members: Sequence[Member], train: Sequence[Sample]) -> None:
        for index, member in enumerate(members):
            seed_everything(self.seed)
            preprocessing = self.input_preprocessing(member)
            images = ImageBatches(
                train, preprocessing, self.batch_size, self.device, f"fit {member.detector_name}", self.skip_bad, self.geometry, self.roi, self.registration
            )
            with member_session(f"member{index}"):
                if self.roi is not None and self.roi.mode == "before":
                    if member.detector.exclude_from_training(self.roi.working_mask(preprocessing, self.device)):
                        info(f"{member.detector_name} learns nothing from outside the region of interest")
                if member.source is not None and member.source.requires_fit:
                    with member_session("source"):
                        member.source.fit(images)
                inputs: Iterable[torch.Tensor] = images if member.source is None else SourceBatches(images, member.source)
                member.detector.fit(CachedBatches(inputs) if member.detector.training_passes > 1 else inputs)
            self.skipped.extend(s for s in images.skipped if s not in self.skipped)

    @property
    def _tiles_per_image(self) -> int:
        layout = self.geometry.layout()
        return 1 if layout is None else layout.count

    def _member_outputs(
        self, members: Sequence[Member], samples: Sequence[Sample], images: Sequence[np.ndarray], left_out: torch.Tensor | None = None
    ) -> list[Prediction]:
        """Each member's prediction on decoded images: per image, or per tile (image after
        image) with a tiling geometry, ``batch_size`` tiles per forward pass (as many as the
        images of an untiled batch: the cost is the tiles' count times one tile's);
        ``left_out``: the inputs' positions in fit order."""
        batches: dict[Preprocessing, torch.Tensor] = {}
        outputs = []
        size = self.batch_size
        for member in members:
            preprocessing = self.input_preprocessing(member)
            if preprocessing not in batches:
                batches[preprocessing] = network_inputs(samples, images, preprocessing, self.geometry, self.device)
            inputs = batches[preprocessing]
            parts = [
                member.predict(inputs[first : first + size], None if left_out is None else left_out[first : first + size])
                for first in range(0, len(inputs), size)
            ]
            outputs.append(parts[0] if len(parts) == 1 else _concatenated(parts))
        return outputs

    def _image_level(self, prediction: Prediction) -> Prediction:
        """A member's per-image prediction: tiles stitched (score: the stitched map's maximum),
        or the prediction as is without tiles."""
        layout = self.geometry.layout()
        return prediction if layout is None else layout.image_prediction(prediction)

    def _member_predictions(
        self, members: Sequence[Member], samples: Sequence[Sample], description: str, left_out: bool = False, synthetic: torch.Generator | None = None
    ) -> Scored:
        """Each member's predictions on the readable ``samples``; ``left_out``: ``samples`` are
        the training images in fit order, scored as left out (with tiles: each tile, at its
        position among the tiles in fit order). With a ``synthetic`` generator, also each
        member's (image-level) predictions on the ensembler's synthetic anomalies made from the
        samples, scored the same way (an anomaly made from a left-out image is left out as it)."""
        kept: list[Sample] = []
        sizes: list[tuple[int, int]] = []
        per_member: list[list[Prediction]] = [[] for _ in members]
        anomalous: list[list[Prediction]] = [[] for _ in members]
        position, per_image = 0, self._tiles_per_image
        for start in track(range(0, len(samples), self.batch_size), description):
            chunk, images = load_images(samples[start : start + self.batch_size], self.skip_bad, [], self.roi, self.registration)
            if not images:
                continue
            indices = torch.arange(position, position + len(images) * per_image) if left_out else None
            position += len(images) * per_image
            kept.extend(chunk)
            sizes.extend(image.shape[:2] for image in images)
            for predictions, prediction in zip(per_member, self._member_outputs(members, chunk, images, indices)):
                predictions.append(prediction)
            if synthetic is not None:
                made = self._synthetic_anomalies(images, synthetic)
                if made:
                    picked = [index for index, _ in made]
                    rows = None if indices is None else indices.reshape(len(images), per_image)[picked].reshape(-1)
                    outputs = self._member_outputs(members, [chunk[i] for i in picked], [image for _, image in made], rows)
                    for predictions, prediction in zip(anomalous, outputs):
                        predictions.append(self._image_level(prediction))
        scored = Scored(kept, sizes, [_concatenated(predictions) for predictions in per_member])
        if synthetic is not None:
            scored.anomalous = [_concatenated(predictions) for predictions in anomalous] if anomalous[0] else []
        return scored

    def _synthetic_anomalies(self, images: Sequence[np.ndarray], generator: torch.Generator) -> list[tuple[int, np.ndarray]]:
        """The ensembler's synthetic anomalies made from decoded images: ``(index, image)`` for
        each image the draw turned anomalous, as uint8 RGB like a decoded image."""
        made = []
        for index, image in enumerate(images):
            batch = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
            anomaly = self.ensembler.synthesize(batch, generator)  # type: ignore[union-attr]
            if anomaly is None:
                continue
            if tuple(anomaly.shape) != tuple(batch.shape):
                raise VadError(f"score ensemble {self.ensembler_name!r}: synthesize() changed the image's shape {tuple(batch.shape)} to {tuple(anomaly.shape)}")
            pixels = (anomaly[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
            made.append((index, np.ascontiguousarray(pixels)))
        return made

    def _cross_fit_predictions(self, train: Sequence[Sample], synthetic: torch.Generator | None = None) -> Scored:
        """Each training image scored by copies of the members fitted on the other folds."""
        assignment = fold_of(len(train), self.folds, self.seed)
        parts: list[Scored] = []
        for fold in range(self.folds):
            fitted_on = [s for s, f in zip(train, assignment) if f != fold]
            held_out = [s for s, f in zip(train, assignment) if f == fold]
            copies = [member.fresh() for member in self.members]
            with member_session(f"fold{fold}"):
                self._fit_members(copies, fitted_on)
            parts.append(self._member_predictions(copies, held_out, f"cross-fit {fold + 1}/{self.folds}", synthetic=synthetic))
        anomalous = None
        if synthetic is not None:
            with_anomalies = [part.anomalous for part in parts if part.anomalous]
            anomalous = [_concatenated([part[index] for part in with_anomalies]) for index in range(len(self.members))] if with_anomalies else []
        return Scored(
            [s for part in parts for s in part.samples],
            [size for part in parts for size in part.sizes],
            [_concatenated([part.predictions[index] for part in parts]) for index in range(len(self.members))],
            anomalous,
        )

    def _fit_thresholds(self, scored: Scored, method: str) -> None:
        samples = scored.samples
        self.calibration = {"method": method, "scores": len(samples)}
        if self.ensembler is not None:
            normal = [self._image_level(prediction) for prediction in scored.predictions]
            self.ensembler.calibrate(normal)
            if self.ensembler.learns_from_anomalies:
                if not scored.anomalous:
                    raise VadError(
                        f"score ensemble {self.ensembler_name!r} learns from synthetic anomalies, but none was made from the "
                        f"{len(samples)} calibration image(s); check its anomaly options"
                    )
                keep = torch.tensor([s.label == 0 for s in samples])
                self.ensembler.learn([_rows(p, keep) for p in normal], scored.anomalous)
                self.calibration["synthetic_anomalies"] = int(scored.anomalous[0].scores.numel())
        if method == "cross-fit":
            self.calibration["folds"] = self.folds
        if self.threshold is None:
            return
        labels = np.array([s.label for s in samples])
        if self.threshold.needs_anomalous and not labels.any():
            raise VadError(
                f"threshold {self.threshold_name!r} needs anomalous validation images, but the calibration "
                "images are all normal; use a threshold that fits normal-only data "
                f"({_thresholds_where(lambda cls: not cls.needs_anomalous)})"
            )
        scores, pixel_values, pixel_labels = [], [], []
        rng = np.random.default_rng(self.seed)
        per_image = max(1, MAX_THRESHOLD_PIXELS // max(1, len(samples)))
        for output in self._fused_outputs(scored):
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
        self.image_threshold = float(self.threshold.fit(np.asarray(scores), labels))
        self.normal_calibration_scores = np.asarray(scores)[labels == 0]
        self.calibration["image_false_alarm"] = false_alarm_estimate(list(self.normal_calibration_scores), self.image_threshold)
        if pixel_values:
            values, truth = np.concatenate(pixel_values), np.concatenate(pixel_labels)
            if self.threshold.needs_anomalous and not truth.any():
                self.pixel_threshold = None
                warn("no anomalous validation pixels: pixel-level decisions (IoU) are left out")
            else:
                self.pixel_threshold = float(self.threshold.fit(values, truth.astype(np.int64)))

    def _fused_outputs(self, scored: Scored) -> Iterator[Output]:
        """Outputs (score, map at original size; no decision) from the members' predictions."""
        reference = self.input_preprocessing(self.members[0])
        per_image = self._tiles_per_image
        for start in range(0, len(scored.samples), self.batch_size):
            window = slice(start, start + self.batch_size)
            rows = slice(start * per_image, (start + self.batch_size) * per_image)
            batch = [self._image_level(Prediction(p.scores[rows], None if p.maps is None else p.maps[rows])) for p in scored.predictions]
            fused = self.ensembler.combine(batch) if self.ensembler is not None else batch[0]
            chunk = scored.samples[window]
            scores, maps = self._scores_and_maps(fused, reference, scored.sizes[window])
            for index, sample in enumerate(chunk):
                yield Output(sample, float(scores[index]), None, None if maps is None else maps[index])

    def _scores_and_maps(
        self, prediction: Prediction, reference: Preprocessing, sizes: Sequence[tuple[int, int]], alignments: Sequence[Alignment] = ()
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Image scores and maps at the images' ``sizes`` (in each file's frame, with
        ``alignments``) from the fused prediction; with an ``after`` ROI, the score is the
        working-size map's maximum inside it (:mod:`vad.roi`)."""
        scores = prediction.scores
        if prediction.maps is None:
            return scores.detach().float().cpu().numpy(), None
        working = upsample_and_blur(prediction.maps.float(), reference.size, self.sigma)
        if self.roi is not None:
            scores = self.roi.restrict(working, self.roi.working_mask(reference, working.device))
        return scores.detach().float().cpu().numpy(), self.original_maps(working, reference, sizes, alignments)

    def original_maps(
        self, working: torch.Tensor, reference: Preprocessing, sizes: Sequence[tuple[int, int]], alignments: Sequence[Alignment] = ()
    ) -> list[np.ndarray]:
        """Maps at the working size (upsampled and blurred) to each image's original size: the
        ROI's outside filled (``after`` mode) and, with ``alignments``, resampled from the
        reference frame back into each file's own frame."""
        maps = working_to_original(working, reference, sizes)
        if self.roi is not None:
            maps = [self.roi.fill_outside(m) for m in maps]
        if self.registration is not None and alignments:
            maps = [self.registration.to_original(m, a, m.shape) for m, a in zip(maps, alignments)]
        return maps

    def check_roi(self, roi: Roi) -> None:
        """A clear error, before anything is fitted, for an ROI this model cannot honour."""
        if self.geometry.tiled:
            raise VadError("a region of interest (--roi) cannot be combined with tiles (--tile) yet; use --image-size instead")
        if roi.mode == "after" and not self.produces_maps:
            raise VadError("ROI mode 'after' restricts the anomaly map, but the detector gives image scores only; use --roi-mode before")

    # ------------------------------------------------------------------ predict

    def predict(self, samples: Sequence[Sample], description: str = "predict") -> Iterator[Output]:
        """Score every sample; maps come back at each image's original resolution."""
        reference = self.input_preprocessing(self.members[0])
        for start in track(range(0, len(samples), self.batch_size), description):
            alignments: list[Alignment] = []
            kept, images = load_images(samples[start : start + self.batch_size], self.skip_bad, self.skipped, self.roi, self.registration, alignments)
            if not images:
                continue
            predictions = [self._image_level(p) for p in self._member_outputs(self.members, kept, images)]
            prediction = self.ensembler.combine(predictions) if self.ensembler is not None else predictions[0]
            scores, maps = self._scores_and_maps(prediction, reference, [image.shape[:2] for image in images], alignments)
            for index, sample in enumerate(kept):
                score = float(scores[index])
                error = alignments[index].error if alignments else None
                yield Output(sample, score, self.decide(score), None if maps is None else maps[index], error)

    def decide(self, score: float) -> bool | None:
        """The image decision: anomalous at or above the image threshold (None without one)."""
        return None if self.image_threshold is None else bool(score >= self.image_threshold)

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
        try:
            model = model_from_document(document, tensors, registry)
        except UnknownNameError:
            raise  # a plugin that is not installed: the folder is fine
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OptionError) as error:
            raise DamagedModelError(
                folder, f"{artifacts.MODEL_JSON} / {artifacts.TENSORS_FILE}", f"do not hold what its components need ({type(error).__name__}: {error})"
            ) from error
        return model.to(torch.device(device))
