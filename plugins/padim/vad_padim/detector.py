"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR Workshops 2021).

Who does what in vad:

* the FeatureSource (``vad.features.PatchFeatures``) picks the layers, upsamples deeper layers to
  the first layer's grid and concatenates them: it hands this detector grids ``[B, C, h, w]``;
* this detector reduces the channels (random subset or PCA), fits one Gaussian
  ``N(mu_p, Sigma_p)`` per grid position ``p`` on the training images, and scores each test
  patch by its Mahalanobis distance to its position's Gaussian; ``predict`` returns the distance
  maps ``[B, h, w]`` **on the feature grid** and the image score = the largest patch distance;
* vad's post-processing upsamples the maps, smooths them (Gaussian, sigma 4) and resizes them to
  each image's original size, as the official code does after scoring.

The feature source the paper uses (pass it on the command line)::

    vad run --detector padim --backbone resnet18 --layer layer1 --layer layer2 --layer layer3 --aggregation 1

i.e. the three first stages (strides 4, 8 and 16) **without** PatchCore's 3x3 neighbourhood
aggregation (``--aggregation 1``), with ``dim=100`` for ResNet18 (448 channels) and ``dim=550``
for Wide-ResNet50-2 (1792 channels; ``--set padim.dim=550``). :attr:`PaDiM.recommended_features`
states the same for programs. vad's defaults (stride 8 + 16, 3x3 aggregation) also work.

Where this implementation differs from the official code and anomalib, and why:

* deeper layers are aligned to the first layer's grid by ``PatchFeatures``' bilinear
  upsampling; the official ``embedding_concat`` (and anomalib's ``mode="nearest"``) replicates
  each deep cell over the ``s x s`` shallow cells it covers (nearest neighbour). Both place the
  same features on the same positions; bilinear varies smoothly between cells;
* the random channel subset is drawn from torch's generator with the detector's ``seed``
  (the official code: Python's ``random.sample`` under seed 1024), so the indices differ but
  follow the same rule, and are saved with the model;
* the Gaussians are fitted streaming (sums of ``x`` and ``x x^T`` in float64 per position, see
  :mod:`vad_padim.gaussian`) instead of stacking every training embedding; the covariance is the
  same unbiased estimate plus ``eps * I`` (``eps = 0.01`` as official);
* the image score is the maximum of the grid map; the official code takes the maximum after
  upsampling and Gaussian smoothing (and a min-max normalisation over the test set, which does
  not change the ranking). Smoothing lowers isolated one-patch peaks, so the two can rank
  images slightly differently.

Memory use, with formulas: ``plugins/padim/README.md``. ``fit`` refuses, before allocating
anything, when the stored inverse covariances would exceed ``max_covariance_gb``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option
from vad.progress import warn
from vad_padim.gaussian import GaussianAccumulator, covariance_bytes, left_out_distances, mahalanobis_map
from vad_padim.reduction import ChannelScatter, random_channel_subset

#: Version of the saved state; bump when the meaning of the saved tensors changes.
PADIM_STATE_VERSION = 1


class PaDiM(Detector):
    """PaDiM: a Gaussian per patch position, Mahalanobis distance as the anomaly score.

    Options: see :class:`PaDiM.Options`. When the feature source has fewer channels than
    ``dim``, all are kept (with a warning); ``reduction="pca"`` fits the top ``dim`` principal
    axes on the training patches (one more pass over the training data); ``reduction="none"``
    keeps every channel and ignores ``dim``.
    """

    name = "padim"
    input = "features"
    produces_maps = True
    leave_one_out = True
    training_passes = 1

    class Options(Detector.Options):
        dim: int = option(100, "Channels kept per patch (paper: 100 for ResNet18, 550 for Wide-ResNet50-2); all if the source has fewer.", ge=1)
        reduction: Literal["random", "pca", "none"] = option("random", "Channel reduction: random subset (paper), PCA (one more training pass), or none (dim ignored).")
        eps: float = option(0.01, "Covariance regulariser Sigma + eps*I (official 0.01).", gt=0)
        max_covariance_gb: float = option(4.0, "Refuse to fit when the float32 inverse covariances (4*h*w*d*d bytes) exceed this many GB (1e9 bytes).", gt=0)
        seed: int = option(0, "Seed of the random channel subset (official: Python's random under seed 1024).")

    tiny_options: ClassVar[dict[str, Any]] = {"dim": 16}

    #: The feature source of the paper (``PatchFeatures`` options). vad's defaults also work.
    recommended_features: ClassVar[dict[str, Any]] = {
        "layers": "the stride-4, stride-8 and stride-16 stages (ResNet: layer1, layer2, layer3)",
        "aggregation": 1,
        "dim": {"resnet18": 100, "wide_resnet50_2": 550},
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # PCA needs one pass to fit the projection before the Gaussians' pass: ask vad to cache.
        self.training_passes = 2 if self.options.reduction == "pca" else 1
        self.mean: torch.Tensor | None = None  # [P, d]
        self.inverse_covariance: torch.Tensor | None = None  # [P, d, d]
        self.channel_index: torch.Tensor | None = None  # [d] (random)
        self.pca_center: torch.Tensor | None = None  # [C] (pca)
        self.pca_projection: torch.Tensor | None = None  # [C, d] (pca)
        self.in_channels: int | None = None
        self.grid: tuple[int, int] | None = None
        self.train_images = 0

    # ------------------------------------------------------------------ device / state

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its Gaussians."""
        return self.inverse_covariance is not None

    def _tensor_names(self) -> list[str]:
        return ["mean", "inverse_covariance", "channel_index", "pca_center", "pca_projection"]

    def to(self, device: Any) -> PaDiM:
        """Move the Gaussians (and the reduction) to ``device``."""
        super().to(device)
        for name in self._tensor_names():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    def state(self) -> State:
        """Means, inverse covariances and the channel reduction, float32 (indices int64)."""
        if not self.fitted:
            raise VadError("PaDiM is not fitted: call fit() before saving it")
        tensors = {
            name: getattr(self, name).detach().cpu().contiguous()
            for name in self._tensor_names()
            if getattr(self, name) is not None
        }
        assert self.mean is not None and self.grid is not None
        return State(
            meta={
                "padim_state_version": PADIM_STATE_VERSION,
                "reduction": self.options.reduction,
                "feature_dim": int(self.mean.shape[1]),
                "in_channels": self.in_channels,
                "grid": list(self.grid),
                "train_images": self.train_images,
            },
            tensors=tensors,
        )

    def load_state(self, state: State) -> None:
        """Restore a saved PaDiM; checks versions and shapes before changing anything."""
        meta, tensors = state.meta, state.tensors
        version = meta.get("padim_state_version")
        if version != PADIM_STATE_VERSION:
            raise VadError(
                f"this saved PaDiM model has padim_state_version {version!r}, but the installed vad-padim "
                f"reads version {PADIM_STATE_VERSION}: refit the model, or install the vad-padim version that saved it"
            )
        try:
            height, width = (int(v) for v in meta["grid"])
            dim, channels = int(meta["feature_dim"]), int(meta["in_channels"])
            mean, inverse = tensors["mean"], tensors["inverse_covariance"]
        except (KeyError, TypeError, ValueError) as error:
            raise VadError(f"the saved PaDiM state lacks {error}; the model folder is damaged, refit the model") from error
        positions = height * width
        if tuple(mean.shape) != (positions, dim) or tuple(inverse.shape) != (positions, dim, dim):
            raise VadError(
                f"the saved PaDiM tensors are {tuple(mean.shape)} and {tuple(inverse.shape)} but its metadata says "
                f"grid {height}x{width} with {dim} channels; the model folder is damaged"
            )
        reduction = meta.get("reduction")
        if reduction != self.options.reduction:
            raise VadError(f"the saved PaDiM state used reduction {reduction!r} but this detector was built with {self.options.reduction!r}")
        needed = {"random": ["channel_index"], "pca": ["pca_center", "pca_projection"], "none": []}[self.options.reduction]
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise VadError(f"the saved PaDiM state has no {missing[0]!r} tensor; the model folder is damaged")
        device = self.device
        self.mean = mean.to(device, torch.float32)
        self.inverse_covariance = inverse.to(device, torch.float32)
        self.channel_index = tensors["channel_index"].to(device, torch.int64) if "channel_index" in needed else None
        self.pca_center = tensors["pca_center"].to(device, torch.float32) if "pca_center" in needed else None
        self.pca_projection = tensors["pca_projection"].to(device, torch.float32) if "pca_projection" in needed else None
        self.in_channels, self.grid = channels, (height, width)
        self.train_images = int(meta.get("train_images", 0))

    # ------------------------------------------------------------------ fit

    def _check_grid(self, features: Any, where: str) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise VadError(f"PaDiM.{where} expects feature grids [B, C, h, w] from a feature source, got {shape}")
        if min(features.shape[1:]) < 1:
            raise VadError(
                f"the feature grid is {tuple(features.shape[2:])} with {features.shape[1]} channels: the images are "
                "smaller than the feature source's stride; use larger images or shallower layers"
            )
        return features.detach().to(self.device, torch.float32)

    def kept_dim(self, channels: int) -> int:
        """Channels kept for a source with ``channels`` channels (``dim``, or fewer if the source is small)."""
        if self.options.reduction == "none":
            return channels
        if self.options.dim > channels:
            warn(f"PaDiM dim={self.options.dim} but the feature source gives {channels} channels: keeping all {channels}")
            return channels
        return self.options.dim

    def check_memory(self, grid: tuple[int, int], dim: int) -> None:
        """Refuse (VadError) when ``4 * h * w * dim^2`` bytes exceed ``max_covariance_gb``."""
        positions = grid[0] * grid[1]
        needed = covariance_bytes(positions, dim)
        budget = self.options.max_covariance_gb * 1e9
        if needed > budget:
            fitting = max(1, int(math.sqrt(budget / (4 * positions))))
            raise VadError(
                f"PaDiM would store {needed / 1e9:.2f} GB of covariances (4 bytes x {grid[0]}x{grid[1]} positions "
                f"x {dim}^2), above max_covariance_gb={self.options.max_covariance_gb:g}; fitting needs about 3x that. "
                f"Choose dim <= {fitting} (--set padim.dim={fitting}), smaller images or a coarser layer, or raise "
                "--set padim.max_covariance_gb=..."
            )

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit the per-position Gaussians on training grids, streaming (one batch in memory)."""
        center = projection = None
        index: torch.Tensor | None = None
        channels: int | None = None
        grid: tuple[int, int] | None = None
        dim = 0

        def first_batch(features: torch.Tensor) -> None:
            nonlocal channels, grid, dim
            channels, grid = int(features.shape[1]), (int(features.shape[2]), int(features.shape[3]))
            dim = self.kept_dim(channels)
            self.check_memory(grid, dim)

        def same_shape(features: torch.Tensor) -> None:
            shape = (int(features.shape[1]), (int(features.shape[2]), int(features.shape[3])))
            if shape != (channels, grid):
                raise VadError(
                    f"training feature grids changed from {channels} channels on {grid} to {shape[0]} on {shape[1]} "
                    "between batches: PaDiM needs every image at the same size"
                )

        if self.options.reduction == "pca":
            scatter: ChannelScatter | None = None
            for batch in batches:
                features = self._check_grid(batch, "fit")
                if scatter is None:
                    first_batch(features)
                    scatter = ChannelScatter(channels, self.device)  # type: ignore[arg-type]
                same_shape(features)
                scatter.update(features)
            if scatter is None:
                raise VadError("PaDiM got an empty training set: it needs normal training images")
            center, projection = scatter.principal_components(dim)
            del scatter

        accumulator: GaussianAccumulator | None = None
        for batch in batches:
            features = self._check_grid(batch, "fit")
            if accumulator is None:
                if channels is None:
                    first_batch(features)
                if self.options.reduction == "random":
                    index = random_channel_subset(channels, dim, self.options.seed).to(self.device)  # type: ignore[arg-type]
                accumulator = GaussianAccumulator(grid[0] * grid[1], dim, self.device)  # type: ignore[index]
            same_shape(features)
            accumulator.update(self._reduce(features, index, center, projection))
        if accumulator is None:
            raise VadError("PaDiM got an empty training set: it needs normal training images")
        mean, inverse = accumulator.finish(self.options.eps)
        # assign only now, so a failed fit leaves the detector as it was
        self.mean, self.inverse_covariance = mean, inverse
        self.channel_index, self.pca_center, self.pca_projection = index, center, projection
        self.in_channels, self.grid, self.train_images = channels, grid, accumulator.count

    # ------------------------------------------------------------------ predict

    def _reduce(
        self,
        features: torch.Tensor,
        index: torch.Tensor | None,
        center: torch.Tensor | None,
        projection: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.options.reduction == "random":
            return features.index_select(1, index)  # type: ignore[arg-type]
        if self.options.reduction == "pca":
            centered = features - center[None, :, None, None]  # type: ignore[index]
            return torch.einsum("bchw,cd->bdhw", centered, projection)
        return features

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` (max distance) and Mahalanobis maps ``[B, h, w]`` on the feature grid."""
        if not self.fitted:
            raise VadError("PaDiM is not fitted: call fit() (or load a saved model) before predict()")
        features = self._check_grid(batch, "predict")
        shape = (int(features.shape[1]), (int(features.shape[2]), int(features.shape[3])))
        if shape != (self.in_channels, self.grid):
            raise VadError(
                f"PaDiM was fitted on {self.in_channels}-channel grids of {self.grid} but got {shape[0]} channels on "
                f"{shape[1]}: predict with the same feature source and image size as fit"
            )
        embeddings = self._reduce(features, self.channel_index, self.pca_center, self.pca_projection)
        maps = mahalanobis_map(embeddings, self.mean, self.inverse_covariance)  # type: ignore[arg-type]
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Training images scored by Gaussians refitted without each of them, in closed form
        from the in-sample distances (:func:`vad_padim.gaussian.left_out_distances`); the
        channel reduction stays the one fitted on every image."""
        maps = left_out_distances(self.predict(batch).maps, self.train_images)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def export_module(self) -> nn.Module:
        """A traceable head ``features [B, C, h, w] -> (scores [B], maps [B, h, w])`` for ONNX export."""
        if not self.fitted:
            raise VadError("PaDiM is not fitted: nothing to export")
        return PaDiMHead(self)


class PaDiMHead(nn.Module):
    """The fitted PaDiM scoring as a plain module (buffers: reduction, means, inverse covariances)."""

    def __init__(self, detector: PaDiM) -> None:
        super().__init__()
        self.reduction = detector.options.reduction
        empty = torch.empty(0)
        self.register_buffer("channel_index", detector.channel_index if detector.channel_index is not None else empty.long())
        self.register_buffer("pca_center", detector.pca_center if detector.pca_center is not None else empty)
        self.register_buffer("pca_projection", detector.pca_projection if detector.pca_projection is not None else empty)
        self.register_buffer("mean", detector.mean)
        self.register_buffer("inverse_covariance", detector.inverse_covariance)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and grid maps, as :meth:`PaDiM.predict`."""
        if self.reduction == "random":
            features = features.index_select(1, self.channel_index)
        elif self.reduction == "pca":
            features = torch.einsum("bchw,cd->bdhw", features - self.pca_center[None, :, None, None], self.pca_projection)
        batch, dim, height, width = features.shape
        delta = features.reshape(batch, dim, height * width).permute(2, 0, 1).contiguous() - self.mean[:, None, :]
        squared = (torch.bmm(delta, self.inverse_covariance) * delta).sum(2)  # [P, B]
        maps = squared.clamp_min(0).sqrt().permute(1, 0).reshape(batch, height, width)
        return maps.flatten(1).amax(1), maps


__all__ = ["PaDiM", "PaDiMHead", "PADIM_STATE_VERSION"]
