"""Reverse Distillation as a vad image detector (``--detector reverse-distillation``).

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022,
and its official code (github.com/hq-deng/RD4AD: ``main.py``, ``test.py``, ``resnet.py``,
``de_resnet.py``). A frozen pretrained encoder (the teacher) gives three feature levels; the
trainable one-class bottleneck embedding (OCBE) fuses them into a compact embedding, from which
the decoder (the student) rebuilds the three levels in reverse order
(:mod:`vad_reverse_distillation.network`).

Training, as ``main.py``: the OCBE and the decoder (BatchNorm in training mode; the encoder in
eval mode, never updated) minimise the sum over the levels of the mean ``1 - cosine similarity``
between encoder and decoder features, each image's level flattened into one vector
(``loss_fucntion``; anomalib's ``ReverseDistillationLoss`` does the same; the paper's Eq. 2-3
take the cosine per position: ``loss=per-position``), with Adam (lr 0.005, betas 0.5/0.999; no
schedule) on batches of 16 reshuffled every epoch, 200 epochs, 256 px images normalised with the
encoder's mean/std (ImageNet's for ResNets, as ``dataset.py``).

Prediction, as ``test.py: evaluation``: per level ``1 - cosine similarity`` along channels,
upsampled bilinearly (``align_corners=True``) to the input size and added (``amap_mode='a'``;
``map_mode=multiply`` is the function's default ``'mul'``; anomalib's model defaults to add). The
map is returned at the input size (vad then blurs it with ``--sigma``, 4 by default, the
official ``gaussian_filter(sigma=4)``); the image score is the maximum of the map after that
Gaussian smoothing (``sigma`` option, scipy's filter: truncate 4, mode reflect).

Every option's description gives its official value (``vad list detectors --details``).

Deviations:

* **Encoder**: the paper's WideResNet-50-2 (layers 1-3) needs weights that do not ship offline, so
  the default encoder is EfficientNet-Lite0 (``tf_efficientnet_lite0``, ImageNet weights packaged)
  at its stride-4, 8 and 16 levels (``blocks.1``, ``blocks.2``, ``blocks.4``: 24, 40, 112
  channels). Its OCBE and decoder cannot be the ResNet-specific official ones; they are built from
  the encoder levels' channels with the ResNet-18 recipe (basic blocks, 2 per stage; see
  :data:`~vad_reverse_distillation.network.GENERIC_ARCHITECTURE`). With ``encoder=resnet18``,
  ``resnet34``, ``resnet50`` or ``wide_resnet50_2`` (timm, weights from ``weights=FILE``, the hub
  cache, or random with ``pretrained=false``), the OCBE and decoder are exactly the official
  ``BN_layer`` and ``de_resnet*`` (the official checkpoints' ``bn`` and ``decoder`` load into
  them). anomalib 2.7 differs from the official code there: its OCBE for ``wide_resnet50_2`` has
  bottleneck width 64 instead of the official 128, and its Adam betas are (0.5, 0.99).
* The official OCBE's unused ``conv4``/``bn4`` are left out (see
  :class:`~vad_reverse_distillation.network.OneClassBottleneck`).
* The official loop prints test-set metrics every 10 epochs and saves the weights then; the
  weights after the last epoch are the model, as here. Nothing is selected on test labels.
* The encoder's weights are not saved with the model: like every vad backbone, it is rebuilt from
  its options (packaged weights, the ``weights`` file, the hub cache; random weights are drawn
  from ``seed``, so a reloaded model predicts the same).
* ``--backbone detector:reverse-distillation`` exposes the OCBE's one-class embedding (default)
  or the decoder's levels as a FeatureSource: see :class:`ReverseDistillationFeatures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, FeatureInfo, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import layers_at_strides
from vad.options import option
from vad.training import TrainedDetector
from vad_reverse_distillation.network import (
    GENERIC_ARCHITECTURE,
    OFFICIAL_ARCHITECTURES,
    Architecture,
    OneClassBottleneck,
    ReverseDecoder,
    anomaly_map,
    distillation_loss,
    image_scores,
)

#: Strides of the three levels distilled by default (ResNet layer1-3, as the paper).
DEFAULT_STRIDES = (4, 8, 16)
#: What :class:`ReverseDistillationFeatures` may expose.
FEATURE_LAYERS = ("bottleneck", "decoder1", "decoder2", "decoder3")


class ReverseDistillation(TrainedDetector):
    """Reverse Distillation: frozen encoder, one-class bottleneck embedding, reverse decoder."""

    name = "reverse-distillation"
    input = "images"
    produces_maps = True

    class Options(TrainedDetector.Options):
        encoder: str = option("tf_efficientnet_lite0", "Frozen pretrained encoder, a vad backbone name or timm:MODEL (paper: wide_resnet50_2; resnet18/34/50 and wide_resnet50_2 get the official OCBE and decoder; default EfficientNet-Lite0, weights packaged offline).")
        pretrained: bool = option(True, "Load the encoder's pretrained weights (packaged, weights file, or hub cache); false: random weights drawn from seed (scores not meaningful).")
        weights: str | None = option(None, "A local weights file for the encoder (.safetensors or .pth, timm key names).")
        layers: list[str] | None = option(None, "The three encoder levels distilled, shallow to deep, each at twice the stride of the one before; null: those at strides 4, 8, 16 (paper: layer1-3).")
        image_size: int = option(256, "Square input side, a multiple of 32 (official 256).", ge=32, multiple_of=32)
        epochs: int = option(200, "Passes over the training images (official 200).", ge=1)
        batch_size: int = option(16, "Training images per optimiser step, reshuffled every epoch (official 16).", ge=1)
        lr: float = option(0.005, "Adam learning rate of the OCBE and decoder (official 0.005).", gt=0)
        betas: list[float] = option([0.5, 0.999], "Adam betas (official 0.5, 0.999; anomalib uses 0.5, 0.99).", ge=0, lt=1)
        loss: Literal["flattened", "per-position"] = option("flattened", "Cosine loss per level: flattened (official code and anomalib: one cosine per image and level) or per-position (the paper's Eq. 2-3).")
        map_mode: Literal["add", "multiply"] = option("add", "How the per-level maps combine (official evaluation: add; anomalib: add, or multiply).")
        sigma: float = option(4.0, "Gaussian sigma in input pixels of the smoothing before the image score's maximum (official 4; 0: none).", ge=0)

        def check(self) -> None:
            if len(self.betas) != 2:
                raise self.invalid("betas", "two numbers [beta1, beta2] in [0, 1)")
            if self.layers is not None and len(self.layers) != 3:
                raise self.invalid("layers", "three encoder layers, shallow to deep (or null)")

    tiny_options = {"image_size": 64, "epochs": 3, "batch_size": 4}
    #: Three epochs from a pretrained EfficientNet-Lite0 on the tiny data set (measured 0.92-1.0, seeds 0-3).
    tiny_image_auroc = 0.8

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._encoder: Backbone | None = None
        self._levels: list[FeatureInfo] = []

    # ------------------------------------------------------------------ the encoder

    @property
    def encoder(self) -> Backbone:
        """The frozen encoder, built on first use (random weights drawn from ``seed``); the
        resolved ``layers`` are written back into the options."""
        if self._encoder is None:
            encoder = build_encoder(self.options.encoder, self.options.pretrained, self.options.weights, self.options.seed)
            self._levels = encoder_levels(encoder, self.options.layers)
            self.options = self.options.replace(layers=[level.name for level in self._levels])
            self._encoder = encoder.to(self.device)
        return self._encoder

    @property
    def levels(self) -> list[FeatureInfo]:
        """The three distilled encoder levels (name, stride, channels), shallow to deep."""
        self.encoder
        return list(self._levels)

    @property
    def architecture(self) -> Architecture:
        """The official recipe for the official ResNets, else the generic one."""
        return OFFICIAL_ARCHITECTURES.get(encoder_architecture(self.options.encoder), GENERIC_ARCHITECTURE)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's three levels for ``images``: computed without gradient (the encoder is
        frozen), cloned out of inference mode so that the OCBE can train (or be traced) on them."""
        maps = self.encoder.forward_features(images, [level.name for level in self.levels])
        return [maps[level.name].clone() for level in self.levels]

    def to(self, device: torch.device | str) -> ReverseDistillation:
        """Move the OCBE, the decoder and the encoder."""
        super().to(device)
        if self._encoder is not None:
            self._encoder.to(self.device)
        return self

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, normalised with the encoder's mean/std."""
        size, encoder = self.options.image_size, self.encoder.preprocessing
        return Preprocessing(size=(size, size), mean=encoder.mean, std=encoder.std, interpolation="bilinear")

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Image batches ``[B, 3, H, W]`` with sides that are multiples of twice the deepest stride."""
        batch = super().check_batch(batch, where)
        multiple = 2 * self.levels[-1].stride
        height, width = batch.shape[-2:]
        if height % multiple or width % multiple:
            raise VadError(
                f"reverse-distillation {where} needs image sides that are multiples of {multiple} (twice the "
                f"deepest encoder stride), got {height}x{width}; prepare images with the detector's preprocessing (image_size)"
            )
        return batch

    # ------------------------------------------------------------------ training

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The encoder levels the networks are built for (checked again when a model loads)."""
        return {"layers": [level.name for level in self.levels], "channels": [level.channels for level in self.levels]}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """A fresh OCBE and decoder for the encoder's levels (official initialisation)."""
        channels = [level.channels for level in self.levels]
        saved = input_meta.get("channels")
        if saved is not None and list(saved) != channels:
            raise VadError(
                f"the saved reverse-distillation networks were trained on encoder levels with {list(saved)} channels, "
                f"but encoder {self.options.encoder!r} gives {channels}: load it with the encoder it was trained with"
            )
        try:
            return {"bottleneck": OneClassBottleneck(channels, self.architecture), "decoder": ReverseDecoder(channels, self.architecture)}
        except ValueError as error:
            raise VadError(f"reverse-distillation cannot build its networks for encoder {self.options.encoder!r}: {error}") from error

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over the OCBE and the decoder (official lr 0.005, betas 0.5/0.999), no schedule."""
        parameters = [*self.networks["decoder"].parameters(), *self.networks["bottleneck"].parameters()]
        beta1, beta2 = self.options.betas
        return [torch.optim.Adam(parameters, lr=self.options.lr, betas=(beta1, beta2))], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The distillation loss of one batch."""
        levels = self.encode(batch)
        decoded = self.networks["decoder"](self.networks["bottleneck"](levels))
        return distillation_loss(levels, decoded, self.options.loss)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input size and image scores ``[B]`` (max of the smoothed map)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``: encoder, OCBE, decoder, map, score; traceable for ONNX."""
        self.require_fitted()
        # eval(): a fresh module is in training mode, and exporters restore that mode recursively
        # after tracing, which would switch the shared networks' BatchNorm to batch statistics.
        options = self.options
        return ReverseDistillationHead(self.encode, self.networks["bottleneck"], self.networks["decoder"], options.map_mode, options.sigma).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> ReverseDistillationFeatures:
        """The one-class embedding (default) or decoder levels as a FeatureSource."""
        return ReverseDistillationFeatures(self, **options)


class ReverseDistillationHead(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, H, W])`` module around fitted networks."""

    def __init__(self, encode: Any, bottleneck: nn.Module, decoder: nn.Module, map_mode: str, sigma: float) -> None:
        super().__init__()
        self.encode, self.bottleneck, self.decoder = encode, bottleneck, decoder
        self.map_mode, self.sigma = map_mode, sigma

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`ReverseDistillation.predict`."""
        levels = self.encode(images)
        maps = anomaly_map(levels, self.decoder(self.bottleneck(levels)), tuple(images.shape[-2:]), self.map_mode)
        return image_scores(maps, self.sigma), maps


class ReverseDistillationFeatures(DetectorFeatures):
    """Reverse Distillation's learned features as patch features (seed 000's heterogeneous fusion).

    The cut point is the OCBE's output by default (``bottleneck``): the compact one-class
    embedding the decoder rebuilds everything from, ``2 * c3`` channels at twice the deepest
    encoder stride (224 channels at stride 32 for EfficientNet-Lite0, 2048 for WideResNet-50).
    ``decoder1..3`` are the decoder's rebuilt levels 1-3 (channels and strides of encoder levels
    1-3). Several layers are resized bilinearly to the grid of the first and concatenated.
    Preprocessing is the detector's.
    """

    name = "reverse-distillation-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] = option(["bottleneck"], "What to expose: bottleneck (the one-class embedding) and/or decoder1..decoder3 (the rebuilt encoder levels).", choices=FEATURE_LAYERS)

        def check(self) -> None:
            if not self.layers:
                raise self.invalid("layers", f"a non-empty list of {', '.join(FEATURE_LAYERS)}")

    @property
    def out_channels(self) -> int:
        """Sum of the chosen layers' channels."""
        channels = [level.channels for level in self.detector.levels]
        widths = {"bottleneck": 2 * channels[2], "decoder1": channels[0], "decoder2": channels[1], "decoder3": channels[2]}
        return sum(widths[layer] for layer in self.options.layers)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, h, w]`` on the first chosen layer's grid."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        with torch.no_grad():
            embedding = detector.networks["bottleneck"].eval()(detector.encode(images))
            decoded = detector.networks["decoder"].eval()(embedding) if any(layer != "bottleneck" for layer in self.options.layers) else []
            named = {"bottleneck": embedding, **{f"decoder{i + 1}": level for i, level in enumerate(decoded)}}
            chosen = [named[layer] for layer in self.options.layers]
            grid = chosen[0].shape[-2:]
            return torch.cat([c if c.shape[-2:] == grid else F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chosen], dim=1)


# --------------------------------------------------------------------------- the encoder


def encoder_architecture(spec: str) -> str:
    """The timm architecture a spec names: ``timm:wide_resnet50_2.tv_in1k`` -> ``wide_resnet50_2``."""
    return spec.rpartition(":")[2].partition(".")[0]


def build_encoder(spec: str, pretrained: bool, weights: str | None, seed: int) -> Backbone:
    """The registered backbone ``spec`` names (a name, or ``family:model`` such as
    ``timm:resnet34``), frozen; random weights (``pretrained=False``) are drawn from ``seed``
    without touching the global random state."""
    from vad.plugins import create_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_backbone(spec, pretrained=pretrained, weights=weights)


def encoder_levels(encoder: Backbone, layers: Sequence[str] | None) -> list[FeatureInfo]:
    """The three levels to distil: ``layers`` (resolved), or the deepest maps at strides 4, 8, 16;
    each must have twice the stride of the one before (the OCBE halves the side once per step)."""
    infos = encoder.feature_info()
    offered = ", ".join(f"{f.name} (stride {f.stride}, {f.channels} ch)" for f in infos)
    if layers is None:
        levels = layers_at_strides(encoder, DEFAULT_STRIDES, ReverseDistillation.name)
    else:
        known = {f.name: f for f in infos}
        levels = [known[encoder.resolve_layer(layer)] for layer in layers]
    strides = [level.stride for level in levels]
    if strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
        raise VadError(
            f"reverse-distillation needs three encoder levels each at twice the stride of the one before, got "
            f"{[level.name for level in levels]} at strides {strides}; the encoder offers: {offered}"
        )
    return levels
