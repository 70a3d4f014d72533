"""The objects plugins implement and exchange.

Data flows ``Dataset -> Sample -> preprocess -> FeatureSource -> Detector -> Prediction ->
postprocess -> Threshold -> Metric``. Tensors are torch tensors; images, masks and maps that
leave the model (at each image's original resolution) are NumPy arrays. This module imports
neither torch nor NumPy at import time so that the CLI starts fast.

Conventions every implementation follows:

* Image batches entering a FeatureSource or an image Detector are float32 ``[B, 3, H, W]``,
  already resized and normalised as the object's :class:`Preprocessing` says.
* Feature grids are ``[B, C, h, w]``; anomaly maps from ``Detector.predict`` are ``[B, h, w]``
  on the detector's grid (vad upsamples and smooths them, see :mod:`vad.postprocess`).
* Higher scores mean more anomalous.
* Fitted state is a :class:`State`: JSON-safe ``meta`` plus named tensors. vad writes it as
  ``model.json`` + ``*.safetensors`` (never pickle) with atomic renames; see :mod:`vad.artifacts`.
* Every registered class declares its hyper-parameters once, in a nested ``Options`` class
  (:mod:`vad.options`); the constructor takes exactly those as keyword arguments, validates
  them, and keeps them in ``self.options``. ``hparams`` returns them JSON-safe, so
  ``cls(**obj.hparams)`` followed by ``load_state`` rebuilds a fitted object.
* ``tiny_options`` are the options :mod:`vad.testing`'s conformance kit uses on its tiny data
  set (one epoch, small widths): every registered class is run through the kit with them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from vad.options import Configurable, Options, option

if TYPE_CHECKING:  # heavy imports only for type checkers
    from pathlib import Path

    import numpy as np
    import torch

Split = Literal["train", "validation", "test"]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Region:
    """One annotated defect of a sample (MVTec LOCO): its own mask and sPRO saturation.

    ``saturation_area`` is in pixels at the image's original resolution: the overlap at which
    the region counts as fully detected (AU-sPRO).
    """

    mask_loader: Callable[[], np.ndarray]
    saturation_area: float
    defect_name: str = ""

    def load_mask(self) -> np.ndarray:
        """Bool ``[H, W]`` mask of this annotation at original resolution."""
        return self.mask_loader()


@dataclass
class Sample:
    """One image of a data set; pixels are decoded only when ``load_image`` is called.

    ``label`` is 0 for good and 1 for anomalous. ``mask_loader`` is None when the data set has
    no pixel ground truth for this image (good images may use None: an all-false mask).
    ``anomaly_kind`` is e.g. ``"structural"`` or ``"logical"`` (MVTec LOCO), else None.
    """

    path: str
    label: int
    category: str
    split: Split
    defect_type: str = "good"
    image_loader: Callable[[], np.ndarray] | None = None
    mask_loader: Callable[[], np.ndarray] | None = None
    regions: tuple[Region, ...] = ()
    anomaly_kind: str | None = None
    view: str | None = None

    def load_image(self) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` at original resolution."""
        if self.image_loader is not None:
            return self.image_loader()
        from vad.images import read_rgb

        return read_rgb(self.path)

    def load_mask(self) -> np.ndarray | None:
        """Bool ``[H, W]`` ground truth at original resolution, or None if there is none."""
        return None if self.mask_loader is None else self.mask_loader()


@dataclass
class DataSplits:
    """The samples of one category: train (normal only), validation, test."""

    category: str
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    has_masks: bool = True


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a network.

    Images are resized to ``resize`` (``(H, W)``; None means ``size``) with ``interpolation``,
    center-cropped to ``size`` when ``crop`` is true, scaled to [0, 1] and normalised with
    ``mean`` / ``std``.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    resize: tuple[int, int] | None = None
    crop: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for model.json."""
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": None if self.resize is None else list(self.resize),
            "crop": self.crop,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            size=tuple(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bilinear"),
            resize=None if data.get("resize") is None else tuple(data["resize"]),
            crop=bool(data.get("crop", False)),
        )


@dataclass
class Prediction:
    """Output of a detector: ``scores`` ``[B]`` and ``maps`` ``[B, h, w]`` (None if image-only)."""

    scores: torch.Tensor
    maps: torch.Tensor | None = None


@dataclass
class State:
    """Fitted state of a component: JSON-safe ``meta`` and named tensors."""

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a backbone can return."""

    name: str
    stride: int
    channels: int


# ----------------------------------------------------------------- fitted components


class Component(Configurable, abc.ABC):
    """Base of everything a model folder stores: declared options, device, fitted state.

    Subclasses set ``name`` (the registered name) and nest their ``Options`` declaration.
    """

    #: True when ``fit`` must run before ``predict`` / ``__call__``.
    requires_fit: ClassVar[bool] = True

    @property
    def device(self) -> torch.device:
        """Device the component computes on."""
        import torch

        return getattr(self, "_device", torch.device("cpu"))

    def to(self, device: torch.device | str) -> Component:
        """Move tensors and modules to ``device``; returns self."""
        import torch

        self._device = torch.device(device)
        return self

    def state(self) -> State:
        """Fitted state to save. Stateless components return an empty State."""
        return State()

    def load_state(self, state: State) -> None:
        """Restore what :meth:`state` returned (tensors may arrive on the CPU)."""


class Backbone(Component):
    """A frozen network that returns named feature maps.

    Constructed as ``cls(model_name, **options)``; ``preprocessing`` states what its input must
    look like (from the network's pretrained config) and ``feature_info`` what it returns.
    Every backbone accepts ``pretrained`` and ``weights`` (``--no-pretrained``, ``--weights``).
    """

    role = "backbone"
    requires_fit = False
    preprocessing: Preprocessing

    class Options(Options):
        pretrained: bool = option(True, "Load pretrained weights; false: random initialisation (said loudly in the report).")
        weights: str | None = option(None, "A local weights file (.safetensors or .pth) used instead of the packaged or hub weights.")

    #: The model the conformance kit builds for this class's own entry when that entry is a
    #: family (``--backbone timm:MODEL``) rather than a model; None: the class has no family entry.
    tiny_model: ClassVar[str | None] = None

    def __init__(self, model_name: str, **options: Any) -> None:
        self.model_name = model_name
        super().__init__(**options)

    @abc.abstractmethod
    def feature_info(self) -> list[FeatureInfo]:
        """Every feature map ``forward_features`` can return, shallow to deep."""

    @abc.abstractmethod
    def forward_features(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Feature maps ``{name: [B, C, H/stride, W/stride]}`` for the named ``layers``."""

    def resolve_layer(self, layer: str) -> str:
        """The ``feature_info`` name a user's layer reference means (``"2"`` may mean a
        position); names pass through unchanged by default."""
        return layer

    def check_input_size(self, height: int, width: int) -> None:
        """A clear :class:`~vad.errors.VadError` when the network cannot read ``height x width``
        inputs (a vision transformer: sides that are not multiples of its patch); vad calls it
        with the planned input size before a run folder is made. Any size passes by default."""

    #: The user's spec (``"tf_efficientnet_lite0"``, ``"timm:convnext_tiny"``); set by vad.
    spec: str = ""

    @classmethod
    def weights_source(cls, model_name: str) -> str | None:
        """Where pretrained weights for ``model_name`` would come from offline, or None.

        ``vad doctor`` reports it; it must not download or build the network.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Facts for ``vad list backbones --details`` (weights source, preprocessing, layers)."""
        return {
            "preprocessing": self.preprocessing.to_dict(),
            "features": [vars(f) for f in self.feature_info()],
        }


class FeatureSource(Component):
    """Anything that turns a batch of images into a patch-feature grid ``[B, C, h, w]``.

    A backbone plus layer aggregation is one (:class:`vad.features.PatchFeatures`); a
    feature-level ensemble of sources is one; a trained detector may expose one.
    ``requires_fit`` is False for frozen sources; those that learn (PCA fusion) get ``fit``
    called with the training images before any ``__call__``.
    """

    role = "feature source"
    requires_fit = False
    preprocessing: Preprocessing
    #: True when a training image's features do not remember that image: frozen networks, and
    #: statistics over every training patch (PCA, scaling), which one image barely moves. False
    #: for a network trained on the training images (a detector's learned features): its
    #: features of an image it trained on look more normal than those of a new normal image, so
    #: a head on them cannot score that image as left out (calibration then cross-fits or
    #: holds images out: :mod:`vad.calibration`).
    leave_one_out: bool = True

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Learn from training batches (re-iterable: each ``iter()`` is a fresh pass)."""

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features ``[B, C, h, w]`` for preprocessed images ``[B, 3, H, W]``."""

    @property
    @abc.abstractmethod
    def out_channels(self) -> int:
        """C of the returned grid."""

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this source: ``{"kind": ..., "hparams": ...}``."""
        return {"kind": self.name, "hparams": self.hparams}


class Detector(Component):
    """An anomaly detection head or model.

    ``input`` says what ``fit`` and ``predict`` receive: ``"features"`` (grids from a
    FeatureSource) or ``"images"`` (preprocessed images; the detector then defines its own
    ``preprocessing``). ``produces_maps`` is False for image-level-only detectors: vad then
    skips pixel metrics and says so in the report.
    """

    role = "detector"
    input: ClassVar[Literal["features", "images"]] = "features"
    produces_maps: ClassVar[bool] = True
    #: How many times ``fit`` iterates its batches (epochs); above 1, vad caches the inputs
    #: (images or features) in memory within a budget instead of decoding images and
    #: recomputing backbone features every pass.
    training_passes: int = 1
    #: For ``input == "images"``: how images must be prepared.
    preprocessing: Preprocessing | None = None
    #: True when :meth:`predict_left_out` scores training images as if each had been left out
    #: of fit: vad then fits thresholds on those scores and trains on every image.
    leave_one_out: ClassVar[bool] = False
    #: False for detectors whose fit trains networks (an optimiser loop, however few its
    #: epochs): ``auto`` calibration then holds images out instead of fitting ``folds`` copies.
    cheap_to_refit: ClassVar[bool] = True
    #: The image AUROC this detector reaches at least on :mod:`vad.testing`'s tiny data set
    #: with ``tiny_options``; the conformance kit checks it. None: no claim (e.g. a method that
    #: needs more training than a test can afford).
    tiny_image_auroc: ClassVar[float | None] = 0.9

    @property
    def score_kind(self) -> str | None:
        """What the scores are when they have a fixed meaning a threshold rule can rely on (e.g.
        ``"-log10 NFA"``); None for ordinary anomaly scores, whose scale only calibration knows."""
        return None

    @property
    @abc.abstractmethod
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` ran."""

    @abc.abstractmethod
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Learn from normal training data. ``batches`` is re-iterable (one pass per ``iter``)."""

    @abc.abstractmethod
    def predict(self, batch: torch.Tensor) -> Prediction:
        """Scores ``[B]`` and maps ``[B, h, w]`` (or None) for one batch."""

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Like :meth:`predict`, for training images, each as if it had been left out of fit:
        ``indices`` are the images' positions in the order ``fit`` saw them (0, 1, ...).
        Offered when :attr:`leave_one_out` is True."""
        raise NotImplementedError(f"{self.describe_owner()} cannot score training images as left out")

    def exclude_from_training(self, inspected: torch.Tensor) -> bool:
        """Called before ``fit`` when a region of interest paints the images outside it
        (:mod:`vad.roi`, mode ``before``): ``inspected`` is the region at the size of ``fit``'s
        input images (bool ``[H, W]``). A detector that can leave what lies outside out of what
        it learns (PatchCore: those patches out of its memory bank) remembers it and returns
        True; the default learns from everything and returns False."""
        return False

    def feature_source(self, **options: Any) -> DetectorFeatures | None:
        """A :class:`DetectorFeatures` over this detector's internals, if it offers one."""
        return None

    def export_module(self) -> torch.nn.Module | None:
        """A traceable module mapping a ``predict`` input batch to ``(scores [B], maps [B, h, w])``
        for ONNX export (``vad export``), or None when the head cannot be exported."""
        return None


class DetectorFeatures(FeatureSource):
    """A detector's learned features as a FeatureSource (``--backbone detector:NAME``): seed
    000's heterogeneous fusion of different trained methods.

    Built by :meth:`Detector.feature_source` with the source's own options (e.g. which layers);
    vad saves it as the detector's name and options plus these options, and rebuilds it as
    ``cls(**detector_options).feature_source(**options)`` followed by ``load_state``. Fitting
    the source trains the detector when it is not fitted yet; its state is the detector's.
    """

    kind: ClassVar[str] = "detector-features"
    leave_one_out = False

    def __init__(self, detector: Detector, **options: Any) -> None:
        super().__init__(**options)
        self.detector = detector

    @property
    def hparams(self) -> dict[str, Any]:
        """The detector's options and this source's."""
        return {"detector": self.detector.hparams, **self.options.to_dict()}

    def config(self) -> dict[str, Any]:
        """``{"kind": "detector-features", "detector": NAME, "hparams": ...}``."""
        return {"kind": self.kind, "detector": self.detector.name, "hparams": self.hparams}

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        """True until the detector is fitted."""
        return not self.detector.fitted

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """The detector's preprocessing."""
        assert self.detector.preprocessing is not None, "a detector's features read images"
        return self.detector.preprocessing

    @property
    def device(self) -> torch.device:
        """The detector's device."""
        return self.detector.device

    def to(self, device: torch.device | str) -> DetectorFeatures:
        """Move the detector."""
        self.detector.to(device)
        return self

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Train the detector on normal images unless it is fitted."""
        if not self.detector.fitted:
            self.detector.fit(images)

    def state(self) -> State:
        """The detector's state."""
        return self.detector.state()

    def load_state(self, state: State) -> None:
        """Restore the detector's state."""
        self.detector.load_state(state)


class Dataset(Configurable, abc.ABC):
    """A data set in its official on-disk layout under ``root``.

    ``load`` returns a category's :class:`DataSplits`; samples decode lazily. Missing or
    malformed layouts raise :class:`vad.errors.VadError` naming what was expected. Every data
    set takes the run's ``validation_fraction``, ``seed`` and ``skip_bad``.
    """

    role = "data set"

    class Options(Options):
        validation_fraction: float = option(0.0, "Share of normal training images held out as a validation split (0: every image trains; see vad.calibration).", ge=0, lt=1)
        seed: int = option(0, "Seed of the validation split.")
        skip_bad: bool = option(False, "Skip unreadable files and list them, instead of stopping.")

    def __init__(self, root: str | None = None, **options: Any) -> None:
        self.root = root
        super().__init__(**options)

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """Write a tiny example of this data set's on-disk layout under ``folder`` (a few small
        images, masks where the layout has them) and return the ``root`` to pass; None when the
        data set needs no root. The conformance kit checks the data set on it."""
        raise NotImplementedError(f"data set {cls.name!r} does not implement tiny_layout(), so vad.testing cannot check it")

    @abc.abstractmethod
    def categories(self) -> list[str]:
        """Categories available (for real data sets: those present under ``root``)."""

    @abc.abstractmethod
    def load(self, category: str) -> DataSplits:
        """Samples of ``category`` split into train / validation / test."""


class Augmentation(Configurable, abc.ABC):
    """An image or feature transform, or a synthetic-anomaly generator.

    ``target`` is ``"image"`` (``[B, 3, H, W]`` in [0, 1]) or ``"feature"`` (``[B, C, h, w]``).
    Generators return the anomaly mask ``[B, 1, H, W]`` in [0, 1]; plain transforms return None.
    """

    role = "augmentation"
    target: ClassVar[Literal["image", "feature"]] = "image"

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transformed batch and anomaly mask (or None); randomness only from ``generator``."""


class FeatureEnsembler(FeatureSource):
    """A FeatureSource fusing the grids of several member sources (``cls(members, **options)``)."""

    role = "ensembler"

    def __init__(self, members: Sequence[FeatureSource], **options: Any) -> None:
        super().__init__(**options)
        self.members = list(members)

    @property
    def leave_one_out(self) -> bool:  # type: ignore[override]
        """True when every member's features forget their training images."""
        return all(member.leave_one_out for member in self.members)


class ScoreEnsembler(Configurable, abc.ABC):
    """Fuses the predictions of several fitted detectors.

    ``calibrate`` sees each member's predictions on held-out *training normals* (never test
    data); ``combine`` fuses one batch of member predictions into one Prediction.

    An ensemble that learns how to weigh its members (``learns_from_anomalies``) also needs
    anomalous examples, and test labels are off limits: vad turns every calibration image into a
    synthetic anomaly with :meth:`synthesize`, has the same members score those images the same
    way (left out, cross-fitted or held out, as the normals), and after :meth:`calibrate` passes
    both sets of predictions to :meth:`learn`.
    """

    role = "ensembler"
    learns_from_anomalies: ClassVar[bool] = False

    @abc.abstractmethod
    def calibrate(self, member_predictions: Sequence[Prediction]) -> None:
        """Fit per-member statistics from one concatenated Prediction per member on validation normals."""

    def synthesize(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """A synthetic anomaly made from one normal image ``[1, 3, H, W]`` in [0, 1] (same shape
        and range), or None when this draw left the image normal; randomness only from
        ``generator``. Needed when ``learns_from_anomalies``."""
        raise NotImplementedError(f"score ensemble {self.name!r} learns from anomalies but does not implement synthesize()")

    def learn(self, normal_predictions: Sequence[Prediction], anomalous_predictions: Sequence[Prediction]) -> None:
        """Learn how to combine the members from their predictions (one concatenated Prediction
        per member) on the calibration normals and on the synthetic anomalies; called after
        :meth:`calibrate` when ``learns_from_anomalies``."""

    @abc.abstractmethod
    def combine(self, member_predictions: Sequence[Prediction]) -> Prediction:
        """Fuse one batch (one Prediction per member, same images) into one Prediction."""

    def state(self) -> State:
        """Calibration statistics to save."""
        return State()

    def load_state(self, state: State) -> None:
        """Restore calibration statistics."""


class Threshold(Configurable, abc.ABC):
    """Chooses the decision threshold on validation scores.

    ``needs_anomalous`` is True when the rule needs anomalous validation samples (F1-optimal);
    vad refuses such a rule on normal-only validation data instead of degenerating.
    """

    role = "threshold"
    needs_anomalous: ClassVar[bool] = False
    #: False for rules that ignore the validation scores (a fixed value): vad then fits them
    #: without validation images.
    needs_validation: ClassVar[bool] = True
    #: The fewest normal calibration scores the rule can use (k-sigma: 2, to see a spread);
    #: vad checks it before fitting.
    min_scores: ClassVar[int] = 1
    #: The ``Detector.score_kind`` this rule is valid for (a rule that reads a fixed meaning into
    #: the scores, such as an NFA level); vad refuses other detectors and score-level ensembles.
    #: None: any scores.
    requires_scores: ClassVar[str | None] = None

    @abc.abstractmethod
    def fit(self, scores: np.ndarray, labels: np.ndarray) -> float:
        """Threshold for ``scores`` (``labels`` 0 good / 1 anomalous); score >= threshold is anomalous."""


@dataclass
class EvaluationData:
    """What metrics see for one category, everything at each image's original resolution."""

    scores: np.ndarray
    labels: np.ndarray
    maps: list[np.ndarray] | None = None
    masks: list[np.ndarray | None] | None = None
    samples: list[Sample] = field(default_factory=list)
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    #: The region of interest (bool ``[H, W]``, every image's size) when the run has one: pixel
    #: metrics count the pixels inside it only (:mod:`vad.roi`).
    roi: np.ndarray | None = None


@dataclass
class Curve:
    """A curve behind a metric, for the report to draw: the metric's own points, not a re-computation.

    ``x`` ascends; ``x_limit`` is the integration limit to mark (None: the whole curve);
    ``label`` names the area shown in the legend (e.g. ``"AUROC 0.9731"``).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    x_label: str
    y_label: str
    label: str = ""
    x_limit: float | None = None


class Metric(Configurable, abc.ABC):
    """A number (or a few named numbers) computed from :class:`EvaluationData`.

    ``level`` is ``"image"`` or ``"pixel"``; pixel metrics are skipped for detectors without
    maps or data without masks. ``applicable`` may refuse other cases with a reason.
    """

    role = "metric"
    level: ClassVar[Literal["image", "pixel"]] = "image"

    def applicable(self, data: EvaluationData) -> str | None:
        """None if the metric can be computed, else the reason it cannot."""
        return None

    @abc.abstractmethod
    def compute(self, data: EvaluationData) -> float | dict[str, float]:
        """The value, or a dict of full metric names to values for metrics with parts
        (``{"au_spro": …, "au_spro_structural": …, "au_spro_logical": …}``)."""

    def curves(self, data: EvaluationData) -> list[Curve]:
        """The curves this metric integrates (ROC, PRO, ...), drawn by the report; none by default."""
        return []
