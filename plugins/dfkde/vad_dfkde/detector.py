"""DFKDE, deep feature kernel density estimation (anomalib's ``models/image/dfkde``; no paper of
its own: it is DFM's pipeline with a kernel density in place of the Gaussian).

The method, as anomalib defines it: the global average of every channel of a frozen pretrained
network's layer gives one vector per image (anomalib: ResNet-18 ``layer4``, 512 values); a PCA
fitted on the training vectors keeps ``n_pca_components`` (16) components; the coordinates are
scaled (``feature_scaling_method``: ``scale`` divides every vector by the largest norm among the
training coordinates, ``norm`` scales each to unit length); a Gaussian KDE with Scott's bandwidth
(:mod:`vad_dfkde.kde`: kernel covariance ``n^(-2/(d+4))`` times the unbiased covariance of the
``n`` training points in ``d = n_pca_components`` dimensions) is fitted on at most
``max_training_points`` (40000) of them, drawn at random when there are more; the anomaly score
falls as the density rises. Image-level only: no map.

Score (``score``). anomalib returns ``1 / (1 + exp(0.05 * (log p - 12)))`` of the log-density
``log p`` (its ``compute_probabilities``), a decreasing function of ``log p``: it ranks images
exactly as the negative log-density does wherever it is not saturated. vad's default is that
negative log-density (``nll``): the ranking is the method, and the logistic's constants are a
fixed calibration that vad's thresholds do not need. In float32 it saturates (exactly 1 below
``log p`` of about -320), and in anomalib the log-density of an image far from every training
point is already ``-inf`` (its kernels underflow), so all such images tie at 1.
``score=logistic`` gives anomalib's numbers (from vad's log-density, so without those ties until
the logistic itself saturates).

The shared part, pooled vectors and the PCA, is vad-dfm's :mod:`vad_dfm.pca`. Features come from
the feature source; the reference ones are::

    vad run --detector dfkde --backbone resnet18 --layer layer4 --aggregation 1 --image-size 256

(ResNet-18's ImageNet weights are not available offline: pass a file with ``--weights``; without
these options vad's default source, EfficientNet-Lite0 ``blocks.2`` + ``blocks.4`` with 3x3
aggregation, is used).

Where this differs from anomalib 2.7, and why:

* **Several layers.** anomalib pools each layer and concatenates along the batch axis
  (``torch.cat`` without ``dim``), which only works for one layer; vad's source concatenates the
  layers' channels (after upsampling deeper ones to the first one's grid, which changes their
  global average slightly). The reference uses one layer.
* **Too few images.** anomalib fits with as few images as components, where the KDE bandwidth is
  singular; vad asks for more than ``n_pca_components`` images and says so.
* **Subset draw** (more than ``max_training_points`` images): seeded from ``seed`` (anomalib: the
  global random state).
* **Precision.** The PCA is a float64 thin SVD (anomalib: float32), the bandwidth is factored in
  float64 and the log-density is a log-sum-exp (no underflow, above).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option
from vad_dfkde.kde import GaussianKDE
from vad_dfm.pca import PCA, check_grid, collect_vectors, pooled_grid

#: Version of the saved state; bump when the meaning of the saved tensors changes.
DFKDE_STATE_VERSION = 1
#: anomalib's ``compute_probabilities``: ``1 / (1 + exp(SLOPE * (log p - OFFSET)))``.
LOGISTIC_SLOPE, LOGISTIC_OFFSET = 0.05, 12.0


class DFKDE(Detector):
    """DFKDE: PCA of globally pooled deep features, Gaussian KDE; image scores only."""

    name = "dfkde"
    input = "features"
    produces_maps = False
    training_passes = 1

    class Options(Detector.Options):
        n_pca_components: int = option(16, "Principal components kept, the KDE's dimensions (anomalib 16).", ge=1)
        feature_scaling_method: Literal["scale", "norm"] = option("scale", "scale: divide by the largest norm of the training coordinates (anomalib default); norm: each vector to unit length.")
        max_training_points: int = option(40000, "At most this many training images fit the PCA and the KDE, drawn at random with seed beyond it (anomalib 40000).", ge=2)
        score: Literal["nll", "logistic"] = option("nll", "nll: negative log-density (ranks as anomalib); logistic: anomalib's 1/(1+exp(0.05*(log p - 12))).")
        seed: int = option(0, "Seed of the random subset when there are more than max_training_points images (anomalib: global random state).")

    tiny_options: ClassVar[dict[str, Any]] = {"n_pca_components": 4}
    #: On the fake backbone's globally pooled stage2 + stage3 features of the tiny data set: measured 0.92
    #: (0.83-0.94 for 2-6 components: eight training images).
    tiny_image_auroc = 0.85

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.pca: PCA | None = None
        self.kde: GaussianKDE | None = None
        self.max_length: torch.Tensor | None = None  # 0-d, "scale" only
        self.channels: int | None = None
        self.train_images = 0

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its KDE."""
        return self.kde is not None

    def to(self, device: Any) -> DFKDE:
        """Move the PCA and the KDE to ``device``."""
        super().to(device)
        if self.pca is not None and self.kde is not None:
            self.pca, self.kde = self.pca.to(self.device), self.kde.to(self.device)
            if self.max_length is not None:
                self.max_length = self.max_length.to(self.device)
        return self

    # ------------------------------------------------------------------ fit / predict

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Pool every training grid globally, subsample, fit the PCA, scale, fit the KDE."""
        options = self.options
        vectors, grid = collect_vectors(batches, None, "DFKDE", self.device)
        count = int(vectors.shape[0])
        if count > options.max_training_points:
            chosen = torch.randperm(count, generator=torch.Generator().manual_seed(options.seed))[: options.max_training_points]
            vectors = vectors[chosen.to(vectors.device)]
        if vectors.shape[0] <= options.n_pca_components:
            raise VadError(
                f"DFKDE needs more training images than n_pca_components={options.n_pca_components} (its KDE in "
                f"{options.n_pca_components} dimensions), got {vectors.shape[0]}; add images or lower --set dfkde.n_pca_components"
            )
        pca = PCA.fit(vectors, components=options.n_pca_components, owner="DFKDE")
        coordinates = pca.project(vectors)
        max_length = coordinates.norm(dim=1).max() if options.feature_scaling_method == "scale" else None
        kde = GaussianKDE.fit(scaled(coordinates, options.feature_scaling_method, max_length), owner="DFKDE")
        # assign only now: a failed fit leaves the detector as it was
        self.pca, self.kde, self.max_length = pca, kde, max_length
        self.channels, self.train_images = grid[0], count

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` (no maps)."""
        if self.pca is None or self.kde is None:
            raise VadError("DFKDE is not fitted: call fit() (or load a saved model) before predict()")
        features = check_grid(batch, "DFKDE", "predict").to(self.device)
        if features.shape[1] != self.channels:
            raise VadError(f"DFKDE was fitted on {self.channels}-channel features but got {features.shape[1]}: predict with the same feature source as fit")
        return Prediction(scores=self._head()(features)[0], maps=None)

    def _head(self) -> DFKDEHead:
        return DFKDEHead(self.pca, self.kde, self.max_length, self.options.feature_scaling_method, self.options.score)  # type: ignore[arg-type]

    def export_module(self) -> nn.Module:
        """A traceable head ``features [B, C, h, w] -> (scores [B], None)``."""
        if not self.fitted:
            raise VadError("DFKDE is not fitted: nothing to export")
        return self._head()

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """The PCA, the scaling length and the KDE (whitened training points)."""
        if self.pca is None or self.kde is None:
            raise VadError("DFKDE is not fitted: call fit() before saving it")
        tensors = {**self.pca.tensors(), **self.kde.tensors()}
        if self.max_length is not None:
            tensors["max_length"] = self.max_length.detach().cpu()
        meta = {
            "dfkde_state_version": DFKDE_STATE_VERSION,
            "channels": self.channels,
            "feature_scaling_method": self.options.feature_scaling_method,
            "kde_points": int(self.kde.points.shape[0]),
            "train_images": self.train_images,
        }
        return State(meta=meta, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore a saved DFKDE; versions, options and shapes are checked before anything changes."""
        meta, tensors = state.meta, state.tensors
        version = meta.get("dfkde_state_version")
        if version != DFKDE_STATE_VERSION:
            raise VadError(
                f"this saved DFKDE model has dfkde_state_version {version!r}, but the installed vad-dfkde reads version "
                f"{DFKDE_STATE_VERSION}: refit the model, or install the vad-dfkde version that saved it"
            )
        method = self.options.feature_scaling_method
        if meta.get("feature_scaling_method") != method:
            raise VadError(f"the saved DFKDE state used feature_scaling_method {meta.get('feature_scaling_method')!r}, but this detector was built with {method!r}")
        pca = PCA.from_tensors(tensors, "DFKDE")
        kde = GaussianKDE.from_tensors(tensors, "DFKDE")
        if pca.count != kde.center.shape[0] or pca.count != self.options.n_pca_components or meta.get("channels") != pca.mean.shape[0]:
            raise VadError(
                f"the saved DFKDE state has {pca.count} PCA components, a {kde.center.shape[0]}-d KDE and {pca.mean.shape[0]} input "
                f"channels (metadata: {meta.get('channels')}), but this detector was built with n_pca_components={self.options.n_pca_components}: "
                "the model folder is damaged, or was saved with other options"
            )
        max_length = tensors.get("max_length") if method == "scale" else None
        if method == "scale" and (max_length is None or max_length.ndim != 0):
            raise VadError("the saved DFKDE state has no scalar 'max_length' tensor; the model folder is damaged")
        device = self.device
        self.pca, self.kde = pca.to(device), kde.to(device)
        self.max_length = None if max_length is None else max_length.float().to(device)
        self.channels, self.train_images = pca.mean.shape[0], int(meta.get("train_images", 0))


def scaled(coordinates: torch.Tensor, method: str, max_length: torch.Tensor | None) -> torch.Tensor:
    """anomalib's ``pre_process``: ``scale`` divides by ``max_length``, ``norm`` scales each row to unit length."""
    if method == "scale":
        return coordinates / max_length
    return coordinates / coordinates.norm(dim=1, keepdim=True)


def logistic(log_density: torch.Tensor) -> torch.Tensor:
    """anomalib's ``compute_probabilities``: ``1 / (1 + exp(0.05 * (log p - 12)))``."""
    return torch.sigmoid(LOGISTIC_SLOPE * (LOGISTIC_OFFSET - log_density))


class DFKDEHead(nn.Module):
    """The fitted DFKDE scoring as a plain module (buffers: the PCA, the scaling length, the KDE)."""

    def __init__(self, pca: PCA, kde: GaussianKDE, max_length: torch.Tensor | None, method: str, score: str) -> None:
        super().__init__()
        self.method, self.score = method, score
        for name, value in {"mean": pca.mean, "components": pca.components, "variances": pca.variances, "max_length": max_length}.items():
            self.register_buffer(name, value)
        for name in ("center", "whitening", "points", "log_normaliser"):
            self.register_buffer(name, getattr(kde, name))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(scores [B], None)`` of grids ``[B, C, h, w]``, as :meth:`DFKDE.predict`."""
        pca = PCA(self.mean, self.components, self.variances)
        kde = GaussianKDE(self.center, self.whitening, self.points, self.log_normaliser)
        coordinates = pca.project(pooled_grid(features, None).flatten(1))
        log_density = kde.log_density(scaled(coordinates, self.method, self.max_length))
        return (logistic(log_density) if self.score == "logistic" else -log_density), None


__all__ = ["DFKDE", "DFKDEHead", "DFKDE_STATE_VERSION", "logistic", "scaled"]
