"""DRAEM as a vad image detector (``--detector draem``) and its discriminative features as a FeatureSource.

Training follows the official ``train_DRAEM.py``: each step rotates some normal images, turns
some of them into synthetic anomalies with masks (generators from :mod:`vad_augment`), feeds the
result to the reconstructive sub-network, the concatenation (reconstruction, input) to the
discriminative sub-network, and minimises ``L2(rec, image) + SSIM loss(rec, image) +
focal(softmax(logits), mask)`` with Adam (lr 1e-4 for both networks) and a MultiStepLR that
multiplies the learning rate by 0.2 after 80 % and 90 % of the epochs. Prediction follows
``test_DRAEM.py``: the anomaly map is the softmax probability of the anomalous class and the
image score is the maximum of its 21x21 mean-filtered version.

Deviations (each also noted where it happens):

* image size: ``image_size=None`` means 256 (the official size) on CUDA and 128 on CPU, resolved
  when first needed and written back into the hyper-parameters;
* epochs: the official 700 (the paper's schedule; seed 001 trained 3000) is the default, tests
  use 1;
* the paper's texture opacity range [0.1, 1] (see :class:`vad_augment.generators.PerlinTextureAnomaly`)
  and procedural textures by default instead of DTD (pass ``textures=<DTD images folder>``);
* seed 001's variant: ``anomalies=["perlin", "cutout"]`` (one path per image: none, Perlin or
  cutout); any registered anomaly generator name works;
* the SSIM dynamic range is fixed at 1 (images are in [0, 1]);
* all randomness comes from ``seed`` (weights, augmentations, batch order), so a fit is
  reproducible on a given device.

Training runs through vad's shared loop (:mod:`vad.training`): the training images are held in
memory and reshuffled every epoch into ``batch_size`` batches as the official loader does, and
``vad run`` checkpoints and resumes it (``vad run --resume RUN_FOLDER``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Augmentation, DetectorFeatures, Prediction, Preprocessing
from vad.errors import VadError
from vad.options import option
from vad.training import TrainedDetector
from vad_reconstruction.losses import anomaly_score, focal_loss, ssim_loss
from vad_draem.network import SIZE_MULTIPLE, DiscriminativeSubNetwork, ReconstructiveSubNetwork, discriminative_encoder_widths, init_weights

#: Encoder blocks of the discriminative sub-network a FeatureSource may expose, with their strides.
FEATURE_BLOCKS = {f"block{i + 1}": 2**i for i in range(6)}


class Draem(TrainedDetector):
    """DRAEM: reconstructive + discriminative sub-networks trained on synthetic anomalies."""

    name = "draem"
    input = "images"
    produces_maps = True

    class Options(TrainedDetector.Options):
        image_size: int | None = option(None, "Square input side, a multiple of 32 (official 256); null: 256 on CUDA, 128 on CPU.", ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
        base_channels: int = option(64, "Width of the discriminative network; the reconstructive one is twice as wide (official 64; 4-16 train on a CPU).", ge=1)
        epochs: int = option(700, "Passes over the training images (official 700; seed 001 trained 3000).", ge=1)
        batch_size: int = option(8, "Training images per optimiser step, reshuffled every epoch (official 8).", ge=1)
        lr: float = option(1e-4, "Adam learning rate of both sub-networks (official 1e-4).", gt=0)
        lr_milestones: list[float] = option([0.8, 0.9], "Fractions of the epochs after which the learning rate is multiplied by lr_gamma (official 0.8, 0.9).", gt=0, le=1)
        lr_gamma: float = option(0.2, "Learning-rate factor at each milestone (official 0.2).", gt=0)
        anomalies: list[str] = option(["perlin"], "Anomaly generators, one chosen per anomalous image (seed 001: perlin, cutout); any registered generator name.")
        anomaly_options: dict[str, dict[str, Any]] = option({}, "Options per generator name of anomalies, e.g. {cutout: {size: [0.1, 0.3]}}.")
        textures: str = option("procedural", "Texture source of perlin: procedural, skimage, or a folder of images (DTD, as official).")
        no_anomaly_probability: float = option(0.5, "Share of training images left normal (official 0.5).", ge=0, le=1)
        rotate_probability: float = option(0.3, "Share of training images rotated by up to 90 degrees first (official 0.3).", ge=0, le=1)
        score_window: int = option(21, "Mean filter size of the image score (official 21).", ge=1, rule=(lambda v: v % 2 == 1, "odd"))

        def check(self) -> None:
            if not self.anomalies:
                raise self.invalid("anomalies", "a non-empty list of anomaly generator names such as ['perlin', 'cutout']")
            if set(self.anomaly_options) - set(self.anomalies):
                raise self.invalid("anomaly_options", f"a mapping from names in anomalies {list(self.anomalies)} to their options")

    tiny_options = {"image_size": 64, "base_channels": 4, "epochs": 1, "batch_size": 4}
    #: One epoch of a 4-channel network learns nothing to rank by.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._generators: list[Augmentation] = []
        self._rotation: Augmentation | None = None

    # ------------------------------------------------------------------ contract

    @property
    def image_size(self) -> int:
        """The input side; None is resolved on first use (256 on CUDA, 128 on CPU) and kept."""
        if self.options.image_size is None:
            self.options = self.options.replace(image_size=256 if self.device.type == "cuda" else 128)
        return self.options.image_size

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs in [0, 1] (mean 0, std 1), bilinear resize as DRAEM's cv2.resize."""
        size = self.image_size
        return Preprocessing(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Image batches ``[B, 3, H, W]`` in [0, 1] with sides that are multiples of 32."""
        batch = super().check_batch(batch, where)
        height, width = batch.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise VadError(
                f"draem {where} needs image sides that are multiples of {SIZE_MULTIPLE}, got {height}x{width}; "
                "prepare images with the detector's preprocessing (image_size)"
            )
        return batch

    # ------------------------------------------------------------------ training

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Both sub-networks, initialised as the official ``weights_init`` from ``seed`` (the
        global random state is left as it was)."""
        seed, width = self.options.seed, self.options.base_channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reconstructive = ReconstructiveSubNetwork(3, 3, base_width=2 * width)
            discriminative = DiscriminativeSubNetwork(6, 2, base_width=width)
        generator = torch.Generator().manual_seed(seed)
        init_weights(reconstructive, generator)
        init_weights(discriminative, generator)
        return {"reconstructive": reconstructive, "discriminative": discriminative}

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def before_training(self) -> None:
        """Resolve the image size and build the anomaly generators (checked before any step)."""
        from vad_augment.generators import RandomRotation

        self.image_size
        self._generators = self._anomaly_generators()
        self._rotation = RandomRotation(degrees=90.0, probability=self.options.rotate_probability)

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam (lr for both networks) and the official MultiStepLR at the epoch milestones."""
        options = self.options
        groups = [{"params": self.networks[name].parameters(), "lr": options.lr} for name in ("reconstructive", "discriminative")]
        optimizer = torch.optim.Adam(groups)
        # Official milestones are epochs*0.8 and epochs*0.9 (floats, so MultiStepLR fires at the
        # first integer epoch count reaching them): ceil reproduces that.
        milestones = sorted({max(1, math.ceil(m * options.epochs)) for m in options.lr_milestones})
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=options.lr_gamma)]

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Rotate some images, turn some into synthetic anomalies, and take the official loss."""
        assert self._rotation is not None
        images, _ = self._rotation(batch, generator)
        augmented, masks = self.synthesize(images, self._generators, generator)
        loss, parts = self.training_loss(images, augmented, masks)
        return loss, {name: float(value) for name, value in parts.items()}

    def _anomaly_generators(self) -> list[Augmentation]:
        """The anomaly generators named in ``anomalies`` (vad_augment's, else any registered one)."""
        from vad_augment.generators import anomaly_generators

        options = {name: dict(self.options.anomaly_options.get(name, {})) for name in self.options.anomalies}
        if "perlin" in options:
            options["perlin"].setdefault("textures", self.options.textures)
        return anomaly_generators(self.options.anomalies, options, "draem")

    def synthesize(
        self, images: torch.Tensor, generators: Sequence[Augmentation], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training path per image: normal (``no_anomaly_probability``) or one of the
        ``generators`` chosen uniformly (seed 001's none / Perlin / cutout). Returns the
        anomalous batch and the masks ``[B, 1, H, W]``."""
        from vad_augment.generators import one_anomaly_each

        return one_anomaly_each(images, list(generators), generator, self.options.no_anomaly_probability, "draem")

    def training_loss(self, images: torch.Tensor, augmented: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The official loss ``L2 + SSIM + focal`` for one batch, with its parts."""
        reconstruction = self.networks["reconstructive"](augmented)
        logits = self.networks["discriminative"](torch.cat((reconstruction, augmented), dim=1))
        l2 = F.mse_loss(reconstruction, images)
        ssim = ssim_loss(reconstruction, images)
        focal = focal_loss(torch.softmax(logits, dim=1), masks)
        loss = l2 + ssim + focal
        return loss, {"l2": l2.detach(), "ssim": ssim.detach(), "focal": focal.detach()}

    # ------------------------------------------------------------------ prediction

    def forward_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly probability maps ``[B, H, W]`` (softmax channel 1), networks in eval mode."""
        reconstruction = self.networks["reconstructive"].eval()(images)
        logits = self.networks["discriminative"].eval()(torch.cat((reconstruction, images), dim=1))
        return torch.softmax(logits, dim=1)[:, 1]

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input resolution and image scores ``[B]`` (max of the mean-filtered map)."""
        self.require_fitted()
        images = self.check_batch(batch, "predict")
        with torch.no_grad():
            maps = self.forward_maps(images)
            scores = anomaly_score(maps, self.options.score_window)
        return Prediction(scores=scores, maps=maps)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)`` for ONNX export."""
        self.require_fitted()
        # eval(): a fresh module is in training mode, and exporters restore that mode recursively
        # after tracing, which would switch the shared sub-networks' BatchNorm to batch statistics.
        return DraemExport(self.networks["reconstructive"], self.networks["discriminative"], self.options.score_window).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> DraemFeatures:
        """The discriminative encoder's features as a FeatureSource (default blocks 3 and 4)."""
        return DraemFeatures(self, **options)

    def encoder_features(self, images: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        """The named discriminative encoder blocks for input images (reconstruction computed first)."""
        reconstruction = self.networks["reconstructive"].eval()(images)
        blocks = self.networks["discriminative"].eval().encode(torch.cat((reconstruction, images), dim=1))
        return [blocks[int(name[len("block") :]) - 1] for name in layers]


class DraemExport(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, H, W])`` module around fitted sub-networks."""

    def __init__(self, reconstructive: nn.Module, discriminative: nn.Module, score_window: int) -> None:
        super().__init__()
        self.reconstructive, self.discriminative, self.score_window = reconstructive, discriminative, score_window

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`Draem.predict`."""
        reconstruction = self.reconstructive(images)
        maps = torch.softmax(self.discriminative(torch.cat((reconstruction, images), dim=1)), dim=1)[:, 1]
        return anomaly_score(maps, self.score_window), maps


class DraemFeatures(DetectorFeatures):
    """DRAEM's discriminative encoder features as patch features (seed 000's heterogeneous fusion).

    For an image batch it runs the reconstructive sub-network, then the discriminative encoder on
    (reconstruction, image), takes the chosen ``layers`` (strides 1..32), resizes them bilinearly
    to the grid of the first one and concatenates channels. Preprocessing is DRAEM's ([0, 1]
    images at ``image_size``).
    """

    name = "draem-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] = option(["block3", "block4"], "Discriminative encoder blocks to expose (block1..block6, strides 1..32).", choices=tuple(FEATURE_BLOCKS))

        def check(self) -> None:
            if not self.layers:
                raise self.invalid("layers", f"a non-empty list of {', '.join(FEATURE_BLOCKS)}")

    @property
    def out_channels(self) -> int:
        """Sum of the chosen blocks' widths (c, 2c, 4c, 8c, 8c, 8c for blocks 1-6)."""
        widths = discriminative_encoder_widths(self.detector.options.base_channels)
        return sum(widths[int(layer[len("block") :]) - 1] for layer in self.options.layers)

    @property
    def stride(self) -> int:
        """Input pixels per grid cell (the first layer's stride)."""
        return FEATURE_BLOCKS[self.options.layers[0]]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, H / stride, W / stride]``."""
        self.detector.require_fitted()
        images = self.detector.check_batch(images, "features")
        with torch.no_grad():
            blocks = self.detector.encoder_features(images, self.options.layers)
            grid = blocks[0].shape[-2:]
            resized = [b if b.shape[-2:] == grid else F.interpolate(b, size=grid, mode="bilinear", align_corners=False) for b in blocks]
            return torch.cat(resized, dim=1)
