"""The feature autoencoder of seed 003 as a vad detector head on any FeatureSource
(``--detector feature-ae``), and its latent maps as a FeatureSource.

The method (seed 003, "Autoencoder + ResNet50 (latent layers)", after DFR: Shi, Yang and Qi,
Neurocomputing 2021, official code github.com/YoungGod/DFR): a frozen ImageNet backbone gives
patch features (seed 003: ResNet-50 layer2 + layer3, 3x3 average pooling, resized to layer2's
28 x 28 grid and concatenated: 1536 channels); a 1x1-convolution autoencoder
(:class:`~vad_feature_ae.network.FeatCAE`) learns to reconstruct the features of normal images
with the mean squared error; a patch the autoencoder reconstructs badly is anomalous. The map is
the squared reconstruction error averaged over the channels at each grid position (DFR's
``compute_energy``), on the feature grid: vad upsamples it to the image (bilinear) and smooths it
(``--sigma``, default 4; ``--sigma 0`` gives the unsmoothed map). The image score is the map's
maximum (DFR's ``metrics_evaluation``; seed 003 does not say how it aggregates).

The feature source is vad's, chosen on the command line as for PatchCore and PaDiM; vad's
default layers are the stride-8 and stride-16 stages with 3x3 aggregation, i.e. seed 003's
layer2 + layer3 on a ResNet. Seed 003's features::

    vad run --detector feature-ae --backbone resnet50 --weights resnet50.safetensors --threshold k-sigma

(``wide_resnet50_2`` likewise). Offline only EfficientNet-Lite0/1/2 have ImageNet weights, so
without ``--backbone`` the features are ``tf_efficientnet_lite0``'s ``blocks.2`` + ``blocks.4``
(40 + 112 = 152 channels, stride 8).

Thresholding: seed 003's "mean reconstruction error plus three standard deviations" is vad's
``--threshold k-sigma`` (``k = 3``, fitted on normal scores the model has not trained on).

Every option's description gives the seed's and DFR's values (``vad list detectors --details``).

Where the seed and DFR differ, the seed is followed:

* ``hidden=400``: seed 003's table has ``1536 -> 400 -> 200 -> 100`` (1,434,036 parameters); DFR's
  width is ``(C + 2L) // 2`` (868 there), which ``hidden=null`` gives;
* ``latent_dim=100``: seed 003's latent width; DFR chooses it from the data (the number of
  principal components explaining ``pca_variance`` = 90 % of the variance of the first 10
  training images' patch features), which ``latent_dim=null`` gives. On features narrower than
  the seed's (lite0: 152 channels) the seed's widths widen to 400 before narrowing to 100;
  ``latent_dim=null hidden=null`` sizes the network to the features as DFR does;
* ``lr=1e-3``: seed 003's Adam learning rate (DFR: 1e-4; both without weight decay).

Deviations from both:

* **Epochs, no early stopping.** Seed 003 stops when the loss on a validation set has not
  improved for two epochs, and does not say on which images; vad's shared training loop runs a
  fixed number of epochs and keeps the weights after the last one, so the default is DFR's fixed
  150 epochs (``main.py``). DFR's batch size 4, reshuffled every epoch, is kept.
* **Feature extraction** is the FeatureSource's: vad's 3x3 aggregation pads with zeros and counts
  them in the mean, and deeper layers are resized bilinearly to the first layer's grid (seed
  003: 3x3 average pooling without padding, then adaptive average pooling to 28 x 28).
* **Map upsampling** is vad's post-processing (DFR: bilinear with ``align_corners=True`` to the
  input size, no smoothing); the image score is the maximum of the grid map, before upsampling.

Mixed precision: bfloat16 autocast (CUDA, ``mixed_precision=true``) is allowed; the loss and the
maps are computed in float32 from the (bfloat16) reconstruction, and prediction never autocasts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing
from vad.errors import VadError
from vad.options import option
from vad.training import TrainedDetector
from vad_feature_ae.network import FeatCAE, FeatureAEHead, dfr_hidden, pca_latent_dim, reconstruction_error

#: Training images whose patch features DFR's latent-width PCA sees (its first loader batch of 10).
PCA_IMAGES = 10


class FeatureAE(TrainedDetector):
    """A 1x1-convolution autoencoder reconstructing patch features; the error is the anomaly map."""

    name = "feature-ae"
    input = "features"
    produces_maps = True
    allows_mixed_precision = True

    class Options(TrainedDetector.Options):
        epochs: int = option(150, "Passes over the training features (DFR 150; seed 003: early stopping with patience 2, which vad's loop does not do).", ge=1)
        batch_size: int = option(4, "Images per Adam step, reshuffled every epoch (DFR 4, shuffled; seed 003: not given).", ge=1)
        lr: float = option(1e-3, "Adam learning rate, no weight decay (seed 003 1e-3; DFR 1e-4).", gt=0)
        latent_dim: int | None = option(100, "Latent channels L (seed 003: 100); null: DFR's rule, the principal components explaining pca_variance of the first 10 training images' patch features.", ge=1)
        hidden: int | None = option(400, "Width between the input and 2L (seed 003: 400 for 1536 channels); null: DFR's (C + 2L) // 2.", ge=1)
        pca_variance: float = option(0.9, "Variance fraction of DFR's latent-width rule with latent_dim=null (DFR 0.90).", gt=0, lt=1)
        source_backbone: str = option("tf_efficientnet_lite0", "Only for --backbone detector:feature-ae: the backbone whose features the source's autoencoder reconstructs (seed 003: resnet50, which needs source_weights offline).")
        source_layers: list[str] | None = option(None, "Only for --backbone detector:feature-ae: its layers (null: the stride-8 and stride-16 stages, seed 003's layer2 + layer3 on a ResNet).")
        source_pretrained: bool = option(True, "Only for --backbone detector:feature-ae: pretrained weights for source_backbone (false: random, for tests only).")
        source_weights: str | None = option(None, "Only for --backbone detector:feature-ae: a local weights file for source_backbone (.safetensors or .pth).")

        def check(self) -> None:
            if self.source_layers is not None and not self.source_layers:
                raise self.invalid("source_layers", "null or a non-empty list of backbone layers")

    tiny_options = {"epochs": 2, "batch_size": 4, "latent_dim": 4, "hidden": 16, "source_backbone": "fake-backbone", "source_pretrained": False}
    #: No claim: two epochs do not teach the autoencoder the tiny data set's normal features.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._pca_sample: torch.Tensor | None = None

    # ------------------------------------------------------------------ inputs

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Feature grids ``[B, C, h, w]``; outside fit, ``C`` must be the fitted width."""
        features = super().check_batch(batch, where)
        channels = self.input_meta.get("channels")
        if where != "fit" and channels is not None and features.shape[1] != channels:
            raise VadError(f"feature-ae was fitted on {channels}-channel features, got {features.shape[1]}: use the feature source it was fitted with")
        return features

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """The shared loop; with ``latent_dim=null`` the first 10 training images' features are
        kept for DFR's latent-width PCA first."""
        self._pca_sample = self._first_images(batches) if self.options.latent_dim is None else None
        try:
            super().fit(batches)
        finally:
            self._pca_sample = None

    def _first_images(self, batches: Iterable[torch.Tensor]) -> torch.Tensor | None:
        taken: list[torch.Tensor] = []
        for batch in batches:
            taken.append(self.check_batch(batch, "fit"))
            if sum(len(t) for t in taken) >= PCA_IMAGES:
                break
        if len({tuple(t.shape[1:]) for t in taken}) > 1:
            raise VadError(f"{self.describe_owner()}: training batches have different shapes; prepare them with one feature source")
        return torch.cat(taken)[:PCA_IMAGES] if taken else None

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The feature width and the latent width (the option, or DFR's PCA rule)."""
        channels = int(first.shape[1])
        latent = self.options.latent_dim
        if latent is None:
            sample = self._pca_sample if self._pca_sample is not None else first
            latent = pca_latent_dim(sample.permute(0, 2, 3, 1).reshape(-1, channels), self.options.pca_variance)
        if latent >= channels:
            raise VadError(
                f"feature-ae: a latent width of {latent} is no bottleneck for {channels}-channel features "
                "(the autoencoder could copy them); set latent_dim below the width, or null for DFR's PCA rule"
            )
        return {"channels": channels, "latent_dim": int(latent)}

    # ------------------------------------------------------------------ training

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """The autoencoder for the saved widths, initialised (PyTorch's defaults, as DFR) from
        ``seed`` without touching the global random state."""
        channels, latent = input_meta.get("channels"), input_meta.get("latent_dim")
        if not isinstance(channels, int) or not isinstance(latent, int) or not 1 <= latent < channels:
            raise VadError("the saved feature-ae state has no valid channel and latent widths; the model folder is incomplete")
        hidden = self.options.hidden if self.options.hidden is not None else dfr_hidden(channels, latent)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            return {"autoencoder": FeatCAE(channels, latent, hidden)}

    def minibatch(self) -> int:
        """DFR's loader: ``batch_size`` images, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam without weight decay (DFR; seed 003's learning rate), no schedule."""
        return [torch.optim.Adam(self.networks["autoencoder"].parameters(), lr=self.options.lr, weight_decay=0)], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The mean squared reconstruction error of the batch (the mean of its maps), in float32."""
        return reconstruction_error(batch, self.networks["autoencoder"](batch)).mean()

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, h, w]`` on the feature grid and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``features -> (scores, maps)`` around the trained autoencoder, in eval mode."""
        self.require_fitted()
        return FeatureAEHead(self.networks["autoencoder"]).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> FeatureAEFeatures:
        """The latent maps of an autoencoder trained on ``source_backbone``'s features. The source
        owns an unfitted copy of this detector: a fitted one does not know which features it was
        trained on, so the source trains its own on its backbone's."""
        return FeatureAEFeatures(type(self)(**self.hparams).to(self.device), **options)


class FeatureAEFeatures(DetectorFeatures):
    """The autoencoder's latent maps ``[B, L, h, w]`` or its residuals ``[B, C, h, w]``
    (``--backbone detector:feature-ae``).

    Cut points: ``output=residual`` (default) is the signed reconstruction error ``x - x_hat``
    of every patch feature, whose squared channel mean is the detector's own map (near 0 where
    the autoencoder learned the normal features); ``output=latent`` is the encoder's output, the
    bottleneck the decoder reconstructs every patch feature from. Residuals fuse better with the
    backbone's own features (the option's description gives the measurement). The features it encodes are
    ``PatchFeatures`` of the detector's ``source_backbone`` at ``source_layers`` (vad's default
    aggregation); fitting the source trains the autoencoder on them. Preprocessing is that
    backbone's; the grid is its first layer's.
    """

    name = "feature-ae-features"

    class Options(DetectorFeatures.Options):
        output: Literal["latent", "residual"] = option(
            "residual",
            "residual: the features minus their reconstruction (the source backbone's channels), the vectors behind the detector's map; "
            "latent: the encoder's output (L channels). Fused with Lite0 by pca-global on the demo, residual 0.990 image AUROC, latent 0.938 (50 epochs; docs/demo-results.md).",
        )

    def __init__(self, detector: FeatureAE, **options: Any) -> None:
        from vad.features import PatchFeatures
        from vad.plugins import create_backbone

        super().__init__(detector, **options)
        settings = detector.options
        backbone_options: dict[str, Any] = {"pretrained": settings.source_pretrained}
        if settings.source_weights is not None:
            backbone_options["weights"] = settings.source_weights
        backbone = create_backbone(settings.source_backbone, **backbone_options).to(detector.device)
        self.patches = PatchFeatures(backbone, layers=settings.source_layers)

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """The source backbone's."""
        return self.patches.preprocessing

    def to(self, device: torch.device | str) -> FeatureAEFeatures:
        """Move the autoencoder and the backbone."""
        super().to(device)
        self.patches.to(self.detector.device)
        return self

    @property
    def out_channels(self) -> int:
        """The latent width (known before fit unless ``latent_dim=null``), or the source
        backbone's channels for residuals."""
        if self.options.output == "residual":
            return self.patches.out_channels
        latent = self.detector.options.latent_dim or self.detector.input_meta.get("latent_dim")
        if latent is None:
            raise VadError("feature-ae-features: with latent_dim=null the latent width is known only after fit; set feature-ae.latent_dim")
        return int(latent)

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Train the autoencoder on the backbone's features of normal images unless it is fitted."""
        from vad.features import SourceBatches
        from vad.training import CachedBatches

        if not self.detector.fitted:
            self.detector.fit(CachedBatches(SourceBatches(images, self.patches)))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Latent maps ``[B, L, h, w]`` or residuals ``[B, C, h, w]`` of preprocessed images ``[B, 3, H, W]``."""
        detector = self.detector
        detector.require_fitted()
        autoencoder = detector.networks["autoencoder"]
        with torch.no_grad():
            features = detector.check_batch(self.patches(images), "features")
            if self.options.output == "residual":
                return features - autoencoder(features)
            return autoencoder.encoder(features)
