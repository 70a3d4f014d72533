"""FRE as a vad image detector (``--detector fre``) and its residual features as a FeatureSource.

Ndiour, Ahuja, Genc and Tickoo, "FRE: A Fast Method For Anomaly Detection And Segmentation", BMVC
2023 (arXiv 2211.12650; the linear-subspace idea first in Ndiour, Ahuja and Tickoo, arXiv
2203.10422, 2022). Official code: github.com/IntelLabs/dfm (``run_mvtec.py``,
``feature_extractor.py``); anomalib 2.7 ships it as ``Fre``.

The method, as the official code: a frozen ImageNet backbone's map at one level (ResNet-18/50
and Wide-ResNet-50-2: ``layer3``, stride 16, on 256 x 256 px inputs, ImageNet-normalised) is
average-pooled with a 2 x 2 kernel and stride 2 and flattened channel-major into one vector per
image (``C * h * w``: 65,536 values for ResNet-50). A shallow linear autoencoder learns to
reconstruct the training vectors: tied weights ``x_hat = W^T (W x + b_enc) + b_dec`` by default
(the paper's proposal), untied (``mode=ae``) or the closed-form PCA that the tied autoencoder
converges to (``mode=pca``, components explaining 97 % of the variance). The autoencoders train
with Adam (lr 1e-3) on the mean squared error, in shuffled batches of 64 vectors, for 250 epochs,
with the PCA's number of components as their latent width. The feature reconstruction error
``e = (x - x_hat)^2``, rearranged as the ``[C, h, w]`` tensor, gives the anomaly map (its channel
mean, the paper's ``M``) and the image score (the square root of its sum: the paper's FRE, the
l2-norm of ``x - x_hat``). Formulas: :mod:`vad_fre.network`.

Fitting runs the backbone once over the training images (as the official ``fit_ae``, which
collects the training features first) and then trains the autoencoder through vad's shared loop
(:mod:`vad.training`) on those vectors: checkpoints, resume and interruption safety as every
trained detector. ``mode=pca`` is closed form (one SVD in float64) and trains nothing.

Every option's description gives the official and anomalib value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Backbone**: the paper's ResNet-50 / Wide-ResNet-50-2 / EfficientNet-B5 need ImageNet weights
  from the hub, which cannot be downloaded here, so the default is ``tf_efficientnet_lite0``
  (weights packaged offline) at its deepest stride-16 level, ``blocks.4`` (112 channels: 7,168
  values per image at 256 px). ``backbone=resnet50`` (with ``weights=<file>`` offline) gives the
  official ResNet and anomalib set-up (``layer=null`` resolves to ``layer3``); the official
  script's default, EfficientNet-B5 at 456 px, reads ``features.6`` (stride 32), which ``layer``
  and ``image_size`` can name for any backbone. Inputs are normalised with the backbone's own
  mean and std (ImageNet for ResNets, as official) and resized bilinearly with anti-aliasing
  (official: Lanczos).
* **Where the official code and anomalib differ, the official code is followed**: 250 epochs
  (anomalib's config: 220), batches of 64 feature vectors reshuffled every epoch (anomalib: the
  data module's image batches, 32 by default), the PCA's number of components as the latent width
  (anomalib: a fixed ``latent_dim=220`` and a hand-given ``input_dim``), and the backbone run once
  per training image (anomalib runs it at every step: the same numbers, slower).
* **Map**: the channel mean (the paper's ``M``); the official code and anomalib sum over the
  channels, ``C`` times larger, the same ranking. The map stays on the pooled grid; vad upsamples
  it bilinearly and smooths it (``--sigma``, default 4): the official code resizes bilinearly and
  does not smooth, so ``--sigma 0`` gives its maps. The image score is the paper's l2-norm,
  before any smoothing; the official code and anomalib score its square (the same ranking; the
  norm keeps float32 ONNX exports within vad's absolute parity tolerance).
* The paper also shows maps combined from three levels; the official code and anomalib read one
  level, as here.
* **Precision**: no bfloat16 autocast (``mixed_precision`` has no effect): FRE measures small
  residuals of the features, which 8-bit mantissas would blur, and the autoencoder's step is cheap.
* The backbone's weights are not saved with the model: it is rebuilt from its options (packaged
  weights, the ``weights`` file, the hub cache; random weights are drawn from ``seed``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import DetectorFeatures, FeatureInfo, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import FrozenLevels, MovesFrozenLevels
from vad.options import option
from vad.training import TrainedDetector
from vad_fre.network import FreScorer, PlainAE, TiedAE, explained_count, pooled, principal_subspace

#: The stride of the official level (ResNet ``layer3``).
PAPER_STRIDE = 16


class Fre(MovesFrozenLevels, TrainedDetector):
    """FRE: the reconstruction error of a shallow linear autoencoder on one pooled backbone level."""

    name = "fre"
    input = "images"
    produces_maps = True
    #: The autoencoder is built for the vectors of ``image_size`` inputs.
    fixed_input_size = True
    allows_mixed_precision = False

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen pretrained backbone, a vad backbone name or timm:MODEL (official resnet18/resnet50/wide_resnet50_2/efficientnet_b5, anomalib resnet50; deviation: EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (packaged, weights file or hub cache); false: random weights drawn from seed, for tests only (scores are not meaningful).")
        weights: str | None = option(None, "A local weights file for the backbone (.safetensors or .pth, timm key names) instead of the packaged or hub weights.")
        layer: str | None = option(None, "The backbone level reconstructed (name or position); null: the deepest at stride 16 (official and anomalib: ResNet layer3; lite0: blocks.4).")
        image_size: int = option(256, "Square input side in pixels (official 256 for the ResNets, 456 for EfficientNet-B5; anomalib 256).", ge=32)
        pooling: int = option(2, "k x k average pooling with stride k of the level's map before flattening (official pool_factor 2, anomalib pooling_kernel_size 2); 1: none.", ge=1)
        mode: Literal["tied-ae", "ae", "pca"] = option("tied-ae", "tied-ae: shared encoder/decoder weights (the paper's proposal, anomalib's only mode); ae: untied linear layers (official 'ae'); pca: the closed-form subspace, no training (official 'pca').")
        latent_dim: int | None = option(None, "Latent width L (official --proj_size; anomalib 220); null: the number of principal components explaining pca_variance of the training features (the official default).", ge=1)
        pca_variance: float = option(0.97, "Variance the principal components keep when latent_dim is null (official --pca 0.97).", gt=0, lt=1)
        mixed_precision: bool = option(False, "No effect: FRE trains in float32 (bfloat16 would blur the small residuals it measures; the autoencoder's step is cheap).")
        epochs: int = option(250, "Passes over the training features (official 250; anomalib 220); unused by mode=pca.", ge=1)
        batch_size: int = option(64, "Feature vectors (one per image) per Adam step, reshuffled every epoch (official 64; anomalib: the image batch, 32); unused by mode=pca.", ge=1)
        lr: float = option(1e-3, "Adam learning rate, constant, no weight decay (official and anomalib 1e-3); unused by mode=pca.", gt=0)

    tiny_options = {"image_size": 64, "epochs": 3, "batch_size": 4}
    #: Three epochs on EfficientNet-Lite0's pooled blocks.4 of the tiny data set (measured 1.0).
    tiny_image_auroc = 0.8

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        options = self.options
        layers = None if options.layer is None else [options.layer]
        self.frozen = FrozenLevels(
            options.backbone, pretrained=options.pretrained, weights=options.weights, layers=layers, strides=(PAPER_STRIDE,), seed=options.seed,
            owner=self.name, option_name="layer",
        )
        #: The closed-form PCA is refitted cheaply: ``auto`` calibration may cross-fit it.
        self.cheap_to_refit = options.mode == "pca"
        self._shape: list[int] | None = None
        self._training_features: torch.Tensor | None = None

    @property
    def training_passes(self) -> int:  # type: ignore[override]
        """One: the backbone sees each training image once; the epochs run over the vectors."""
        return 1

    # ------------------------------------------------------------------ the backbone

    @property
    def level(self) -> FeatureInfo:
        """The reconstructed level (name, stride, channels); ``layer=null`` is resolved on first
        use and written back into the options."""
        (level,) = self.frozen.levels
        if self.options.layer != level.name:
            self.options = self.options.replace(layer=level.name)
        return level

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The level's map for ``images`` (frozen backbone, no gradient)."""
        self.level
        return self.frozen.encode(images)[0]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature tensors ``[B, C, h, w]`` the autoencoder reconstructs."""
        return pooled(self.encode(images), self.options.pooling)

    def feature_shape(self) -> list[int]:
        """``[C, h, w]`` of the pooled features of ``image_size`` inputs (measured once on a blank image)."""
        if self._shape is None:
            size, kernel = self.options.image_size, self.options.pooling
            with torch.no_grad():
                level = self.encode(torch.zeros(1, 3, size, size, device=self.device))
            if min(level.shape[-2:]) < kernel:
                raise VadError(
                    f"fre: {size} px inputs give a {tuple(level.shape[-2:])} map at {self.level.name}, smaller than the "
                    f"{kernel} x {kernel} pooling; raise image_size or lower pooling"
                )
            self._shape = [int(level.shape[1]), *(int(side) // kernel for side in level.shape[-2:])]
        return list(self._shape)

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, the backbone's mean and std."""
        self.level
        return self.frozen.preprocessing(self.options.image_size)

    # ------------------------------------------------------------------ fit

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Image batches; inside :meth:`fit` the loop gets the pooled features fit computed from
        checked images, and passes them through."""
        if where == "fit" and self._training_features is not None:
            return batch
        return super().check_batch(batch, where)

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Pool the training images' features once; then the closed-form PCA (``mode=pca``) or
        the shared loop over the feature vectors. A failed fit leaves the detector as it was."""
        chunks = []
        for batch in batches:
            images = self.check_batch(batch, "fit")
            with torch.no_grad():
                chunks.append(self.features(images))
        if not chunks:
            raise VadError(f"{self.describe_owner()} got an empty training set: it needs normal training images")
        features = torch.cat(chunks)
        if self.options.mode == "pca":
            self._fit_pca(features)
            return
        self._training_features = features
        try:
            super().fit([features])
        finally:
            self._training_features = None

    def _fit_pca(self, features: torch.Tensor) -> None:
        """The official ``fit_pca``: the tied autoencoder set to the principal subspace."""
        components, mean = principal_subspace(features.flatten(1), self.options.latent_dim, self.options.pca_variance)
        input_meta = self._input_meta(list(features.shape[1:]), int(components.shape[0]))
        networks = self.build(input_meta)
        networks["autoencoder"].set_subspace(components.to(self.device), mean.to(self.device))
        networks["autoencoder"].to(self.device).eval().requires_grad_(False)
        self.networks, self.input_meta, self.history, self.epochs_trained = networks, input_meta, [], 0

    def _input_meta(self, shape: list[int], latent: int) -> dict[str, Any]:
        size = math.prod(shape)
        if latent >= size:
            raise VadError(
                f"fre: a latent width of {latent} is no bottleneck for feature vectors of {size} values (the autoencoder "
                "could copy them); set latent_dim below it, or null for the PCA rule"
            )
        return {"layer": self.level.name, "shape": shape, "latent_dim": latent}

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The level, the pooled ``[C, h, w]`` and the latent width (the option, or the number of
        principal components of every training vector explaining ``pca_variance``)."""
        latent = self.options.latent_dim
        if latent is None:
            assert self._training_features is not None, "describe_input runs inside fit"
            vectors = self._training_features.flatten(1).double()
            latent = explained_count(torch.linalg.svdvals(vectors - vectors.mean(dim=0)), self.options.pca_variance)
        return self._input_meta(list(first.shape[1:]), latent)

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """A fresh autoencoder (tied, or untied for ``mode=ae``) initialised from ``seed`` as the
        official code, without touching the global random state; a saved level or shape that the
        options do not give is refused."""
        expected = {"layer": self.level.name, "shape": self.feature_shape()}
        saved = {key: input_meta.get(key, value) for key, value in expected.items()}
        if saved != expected:
            raise VadError(
                f"the saved fre autoencoder reconstructs {saved['layer']} features of shape {saved['shape']}, but backbone "
                f"{self.options.backbone!r} at image_size {self.options.image_size} with pooling {self.options.pooling} gives "
                f"{expected['layer']} features of shape {expected['shape']}: load it with the options it was trained with"
            )
        latent = input_meta.get("latent_dim")
        size = math.prod(expected["shape"])
        if not isinstance(latent, int) or not 1 <= latent < size:
            raise VadError("the saved fre state has no valid latent width; the model folder is incomplete")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            autoencoder = PlainAE(size, latent) if self.options.mode == "ae" else TiedAE(size, latent)
        return {"autoencoder": autoencoder}

    def minibatch(self) -> int:
        """The official loader over the feature vectors: ``batch_size``, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over the autoencoder (official lr 1e-3, no weight decay, no schedule)."""
        return [torch.optim.Adam(self.networks["autoencoder"].parameters(), lr=self.options.lr)], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The official ``nn.MSELoss`` between the vectors and their reconstruction (mean over all values)."""
        vectors = batch.flatten(1)
        return F.mse_loss(self.networks["autoencoder"](vectors), vectors)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, h, w]`` on the pooled grid and image scores ``[B]`` (the error's l2-norm)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> FreScorer:
        """``images -> (scores, maps)``: backbone, pooling, autoencoder, error; traceable for ONNX."""
        self.require_fitted()
        return FreScorer(self.encode, self.options.pooling, self.networks["autoencoder"]).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> FreFeatures:
        """The reconstruction residuals as a FeatureSource."""
        return FreFeatures(self, **options)


class FreFeatures(DetectorFeatures):
    """FRE's residual features (``--backbone detector:fre``).

    Cut point: the signed reconstruction error ``x - x_hat`` rearranged as the pooled feature
    tensor ``[B, C, h, w]`` (the level's channels on the pooled grid): the part of each patch's
    features outside the subspace of normal images, whose squared channel mean is FRE's map. The
    reconstruction itself would look normal on defects too; the latent code is one vector per
    image, not a patch grid. Preprocessing is the detector's.
    """

    name = "fre-features"

    @property
    def out_channels(self) -> int:
        """The level's channels."""
        return self.detector.level.channels

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Residuals ``[B, C, h, w]`` on the pooled grid."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        with torch.no_grad():
            return detector.export_module().residual(images)
