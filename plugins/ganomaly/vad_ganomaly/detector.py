"""GANomaly as a vad image detector (``--detector ganomaly``) and its encoder features as a FeatureSource.

Training follows the official code (github.com/samet-akcay/ganomaly, ``lib/model.py``,
``lib/networks.py``, ``options.py``): a generator G_E -> G_D -> E (DCGAN encoder, decoder,
encoder, latent size ``nz`` 100, width ``ngf`` 64) reconstructs the image and re-encodes the
reconstruction; a discriminator with the encoder's architecture (one output, sigmoid) tells
images from reconstructions. Every step first updates the generator on
``w_adv * L_adv + w_con * L_con + w_enc * L_enc`` (1, 50, 1): L2 between the discriminator's
features of the images and of the reconstructions, L1 reconstruction error, L2 between the two
latent codes; then the discriminator on ``(BCE(D(x), 1) + BCE(D(x^), 0)) / 2`` with the
reconstructions of the same forward pass, and re-initialises the discriminator's weights when
that loss falls below 1e-5. Adam (lr 2e-4, betas 0.5 / 0.999) for each network, 15 epochs of
shuffled batches of 64, weights N(0, 0.02) (BatchNorm N(1, 0.02)), images 32 px in [-1, 1]
(mean 0.5, std 0.5). The score of an image is ``mean((z - z^)^2)`` over the latent dimensions.
The networks, losses and score are in :mod:`vad_ganomaly.network`.

GANomaly gives image scores only (``produces_maps = False``, as anomalib): vad skips pixel
metrics and says so in the report.

Deviations (each also noted in the options' descriptions):

* **Scores per image**: the official ``test()`` (and anomalib) min-max normalises the scores over
  the whole test set; vad keeps each image's raw latent distance, so a score never depends on
  the other test images (thresholds are calibrated on normal training images). Over one test set
  the normalisation is increasing, so the AUROC is the same.
* **Eval mode at test**: the official code never calls ``eval()``: it scores test batches in
  training mode, with BatchNorm's statistics of each test batch (an image's score depends on the
  images beside it). vad scores in eval mode with the running statistics, as anomalib.
* **Model selection**: the official ``train()`` keeps the epoch with the best test AUROC (test
  labels); vad keeps the weights after the last epoch.
* **Last batch**: the official loader drops the last incomplete training batch (``drop_last``;
  with fewer than 64 images it trains nothing); vad's shared loop keeps it, as anomalib.
* **Three discriminator passes per step instead of four**: the official ``backward_g`` runs the
  discriminator on the images again for the feature-matching loss; vad reuses the features of
  the pass that the discriminator's own loss uses (the same values, no gradient reaches the
  generator through them): the updates are the same, the discriminator's BatchNorm running
  statistics (never used) see one update fewer. The official visualisation, which runs the
  generator on a fixed batch in training mode every 1600 images, is not reproduced.
* **Non-square images**: the official folder loader resizes the shorter side and centre-crops;
  vad resizes to a square unless ``--resize``/``--center-crop`` are given.
* **Width of the discriminator**: ``ndf`` (64); the official ``NetD`` is built with ``ngf``
  (its ``ndf`` option is unused), the same by default.
* All randomness (weights, shuffling, the discriminator's re-initialisation) comes from ``seed``.
* **Precision**: float32 only (``allows_mixed_precision = False``): in bfloat16 the
  discriminator's probabilities round to exactly 0 or 1, its loss to 0, and the 1e-5 rule
  would re-initialise it spuriously (torch also refuses the BCE under autocast).

Training runs through vad's shared loop with ``steps_itself`` (generator step, then
discriminator step, each with its own Adam); ``vad run`` checkpoints and resumes it. The model
folder stores both networks; prediction uses the generator only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing
from vad.options import option
from vad.training import TrainedDetector
from vad_ganomaly.network import (
    Discriminator,
    Generator,
    LatentScore,
    dcgan_init,
    discriminator_loss,
    generator_losses,
    is_valid_size,
    latent_distance,
    pyramid_channels,
)


class Ganomaly(TrainedDetector):
    """GANomaly: an encoder-decoder-encoder generator trained adversarially; score ``||z - z^||^2``."""

    name = "ganomaly"
    input = "images"
    produces_maps = False
    fixed_input_size = True
    steps_itself = True
    #: Float32 only: see the module docstring (the discriminator's loss and its re-initialisation rule).
    allows_mixed_precision = False

    class Options(TrainedDetector.Options):
        image_size: int = option(32, "Square input side, a power of two >= 16 (official isize 32; for non-square images the official loader resizes the shorter side and centre-crops, vad resizes to the square).", rule=(is_valid_size, "a power of two of at least 16"))
        nz: int = option(100, "Latent code size (official 100).", ge=1)
        ngf: int = option(64, "Width of the generator's encoders and decoder (official 64).", ge=1)
        ndf: int = option(64, "Width of the discriminator (official 64; the official NetD is built with ngf, equal by default).", ge=1)
        extra_layers: int = option(0, "Extra 3x3 conv layers in every encoder and decoder (official extralayers 0).", ge=0)
        epochs: int = option(15, "Passes over the training images (official niter 15; the official code keeps the epoch with the best test AUROC, vad the last).", ge=1)
        batch_size: int = option(64, "Training images per step, reshuffled every epoch (official 64; the official loader drops the last incomplete batch, vad keeps it).", ge=1)
        lr: float = option(2e-4, "Adam learning rate of both networks (official 2e-4, constant).", gt=0)
        beta1: float = option(0.5, "Adam beta1 of both networks (official 0.5).", ge=0, lt=1)
        beta2: float = option(0.999, "Adam beta2 of both networks (official 0.999).", ge=0, lt=1)
        w_adv: float = option(1.0, "Weight of the adversarial (discriminator feature matching, L2) loss (official 1).", ge=0)
        w_con: float = option(50.0, "Weight of the contextual (L1 reconstruction) loss (official 50).", ge=0)
        w_enc: float = option(1.0, "Weight of the encoder (L2 between the latent codes) loss (official 1).", ge=0)
        reinit_below: float = option(1e-5, "Re-initialise the discriminator's weights when its loss falls below this (official 1e-5; 0: never, as anomalib).", ge=0)

    tiny_options = {"image_size": 16, "nz": 8, "ngf": 4, "ndf": 4, "epochs": 1, "batch_size": 4}
    #: No claim: a GAN trained for one step of four-channel networks ranks nothing.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs in [-1, 1] (official ``Normalize((0.5,) * 3, (0.5,) * 3)``), bilinear resize."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")

    # ------------------------------------------------------------------ training

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Generator and discriminator with the official ``weights_init`` drawn from ``seed``
        (generator first, as official); the global random state is left as it was."""
        options = self.options
        with torch.random.fork_rng(devices=[]):
            generator = Generator(options.image_size, options.nz, options.ngf, options.extra_layers)
            discriminator = Discriminator(options.image_size, options.ndf, options.extra_layers)
        draws = torch.Generator().manual_seed(options.seed)
        dcgan_init(generator, draws)
        dcgan_init(discriminator, draws)
        return {"generator": generator, "discriminator": discriminator}

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """One Adam per network (official: lr 2e-4, betas (0.5, 0.999), no schedule)."""
        options = self.options
        betas = (options.beta1, options.beta2)
        generator = torch.optim.Adam(self.networks["generator"].parameters(), lr=options.lr, betas=betas)
        discriminator = torch.optim.Adam(self.networks["discriminator"].parameters(), lr=options.lr, betas=betas)
        self._optimizers = (generator, discriminator)
        return [generator, discriminator], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The official ``optimize_params``: a generator step, then a discriminator step on the
        same forward pass's reconstructions, then the re-initialisation rule. Returns the
        generator's loss (recorded by the loop) and every part."""
        assert self._optimizers is not None, "ganomaly trains through fit()"
        optimizer_g, optimizer_d = self._optimizers
        options = self.options
        netg, netd = self.networks["generator"], self.networks["discriminator"]
        reconstruction, latent_i, latent_o = netg(batch)
        real, real_features = netd(batch)
        fake, _ = netd(reconstruction.detach())
        _, fake_features = netd(reconstruction)
        adversarial, contextual, encoder = generator_losses(batch, reconstruction, latent_i, latent_o, real_features.detach(), fake_features)
        loss_g = options.w_adv * adversarial + options.w_con * contextual + options.w_enc * encoder
        self.optimizer_step(optimizer_g, loss_g)
        loss_d = discriminator_loss(real, fake)
        self.optimizer_step(optimizer_d, loss_d)
        reinitialised = self.reinitialise_collapsed_discriminator(loss_d, generator)
        parts = {"adversarial": adversarial, "contextual": contextual, "encoder": encoder, "discriminator": loss_d}
        return loss_g.detach(), {**{name: float(value.detach()) for name, value in parts.items()}, "reinitialised": float(reinitialised)}

    def reinitialise_collapsed_discriminator(self, loss_d: torch.Tensor, generator: torch.Generator) -> bool:
        """The official ``reinit_d``: when the discriminator's loss is below ``reinit_below``,
        draw its weights afresh as ``weights_init`` does (its Adam state is kept, as official)."""
        if float(loss_d.detach()) >= self.options.reinit_below:
            return False
        dcgan_init(self.networks["discriminator"], generator)
        return True

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Latent-distance scores ``[B]``, no maps."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """The generator as ``images -> (scores, None)`` (in eval mode: exporters restore the
        mode they found after tracing)."""
        self.require_fitted()
        return LatentScore(self.networks["generator"]).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> GanomalyFeatures:
        """The first encoder's last feature map as a FeatureSource."""
        return GanomalyFeatures(self, **options)


class GanomalyFeatures(DetectorFeatures):
    """GANomaly's features as patch features (``--backbone detector:ganomaly``).

    Cut point: the generator's first encoder G_E just before its latent convolution, a
    ``[B, ngf * image_size / 8, 4, 4]`` map (stride ``image_size / 4``) whose 4x4 convolution
    gives the latent code z. Preprocessing is the detector's.
    """

    name = "ganomaly-features"

    @property
    def out_channels(self) -> int:
        """G_E's last width: ``ngf`` doubled at each halving down to 4 px."""
        options = self.detector.options
        return pyramid_channels(options.image_size, options.ngf)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, 4, 4]``."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        with torch.no_grad():
            return detector.networks["generator"].eval().encoder_features(images)
