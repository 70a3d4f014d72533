"""f-AnoGAN as a vad image detector (``--detector f-anogan``) and its critic features as a FeatureSource.

The method follows the official code (github.com/tSchlegl/f-AnoGAN): ``wgangp_64x64.py`` trains
a ResNet WGAN-GP on 64 x 64 grey patches in [-1, 1] (latent 128 drawn from N(0, 1), width 64,
gradient-penalty weight 10, 5 critic iterations per generator iteration, Adam lr 1e-4 with betas
(0, 0.9) for both networks, batches of 64, each training image flipped horizontally with
probability 0.5 by the loader); ``z_encoding_izif.py`` then trains the izi_f encoder with the
generator and critic frozen, on ``mean((x - G(E(x)))^2) + kappa mean((f(x) - f(G(E(x))))^2)``
(``f``: the critic's last features, kappa 1) with TensorFlow's RMSProp at lr 5e-5 for 50,000
iterations of 64; ``anomaly_detection.py`` scores an image by that same residual. Networks and
formulas: :mod:`vad_fanogan.network`.

The defaults are the reference setup of Bergmann's thesis for MVTec AD (Ch. 4, which ran the
official implementation): grey images zoomed to 256 x 256, 50,000 random 64 x 64 training
patches, the GAN trained for 100 epochs over them, the encoder for 50,000 iterations, testing
patch by patch with stride 64 (:func:`vad_reconstruction.patches.reconstruct_by_patches`) and
the per-pixel squared residual as the anomaly map. The thesis' MVTec LOCO setup (Ch. 6) is
``image_size=64, patches=null``: each whole image zoomed to 64 x 64 is one patch.

Training has two phases in vad's shared loop (:mod:`vad.training`), which sees the sampled
patches, reshuffled every epoch into batches of ``batch_size``: the first ``epochs`` epochs train
the GAN, each batch one critic step, with a generator step before every ``critic_iterations``-th
critic step after the first (the official loop, counted across epochs); the next
``encoder_epochs`` epochs train the encoder, one RMSProp step per batch, with the generator and
the critic frozen and in eval mode. The encoder's 50,000 official iterations are expressed as
passes over the patches: 64 epochs of ``ceil(50,000 / 64) = 782`` batches = 50,048 iterations.

Prediction: the image (grey, [-1, 1]) is cut into 64 x 64 patches ``stride`` apart (the last row
and column flush with the border); each is encoded and generated, the reconstructions are put
back (averaged where patches overlap) and the map is ``(x - G(E(x)))^2`` per pixel. The image
score is the largest izi_f residual of its patches (official score per 64 px image; the thesis
takes the maximum over each image).

Deviations (each also noted where it happens):

* **Image score over patches**: the official score is per 64 x 64 image; a larger image takes
  the maximum of its patches' scores. ``image_score=map_max`` gives the score of the thesis'
  benchmark tables instead (the maximum of the per-pixel map).
* **Patches**: drawn once per fit from the training images after vad's resize (antialiased
  bilinear; the thesis zooms with HALCON), from ``seed``, and kept as 8-bit grey values, as the
  official loader reads 8-bit PNGs (50,000 patches: 205 MB). The last batch of an epoch holds the
  remainder (the official loader yields full batches only).
* **Generator BatchNorm statistics**: torch updates the moving averages on every training-mode
  pass, so also when the generator makes the critic's fakes (official: only in generator steps);
  the averages follow the generator a little faster.
* **Encoder optimiser**: TensorFlow 1's RMSProp as official (decay 0.9, epsilon 1e-10, mean
  square starting at 1), rebuilt on torch's (:func:`vad_fanogan.network.official_rmsprop`); the
  thesis names no optimiser for the encoder.
* **LOCO augmentations** (rotation, colour jitter) are not applied; only the official loader's
  horizontal flips (``flip_probability``).
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4); the thesis does
  not: ``--sigma 0`` gives its maps. Image scores are computed before smoothing.
* **Precision**: float32 only (``allows_mixed_precision = False``): the gradient penalty
  differentiates the critic's gradient, and the official code trains in float32.

Colour is lost, as in the official code and the thesis: colour-only defects are invisible.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing
from vad.options import option
from vad.training import TrainedDetector, train
from vad_fanogan.network import (
    PATCH,
    Critic,
    Encoder,
    Generator,
    critic_loss,
    frozen,
    grey_levels,
    izif_residual,
    official_rmsprop,
    to_model_range,
)
from vad_reconstruction.patches import reconstruct_by_patches

#: Adam's betas of the official WGAN-GP training (both networks).
ADAM_BETAS = (0.0, 0.9)
#: Patches per gather while sampling the training patches (bounds the index tensors' memory).
SAMPLING_CHUNK = 512


class FAnoGan(TrainedDetector):
    """f-AnoGAN: a WGAN-GP on grey patches, then an izi_f encoder; patchwise residual scoring."""

    name = "f-anogan"
    input = "images"
    produces_maps = True
    #: The model learnt patches of images zoomed to ``image_size``: other sizes change their scale.
    fixed_input_size = True
    #: The GAN alternates critic and generator steps, the encoder has its own optimiser.
    steps_itself = True
    #: float32 as official: the gradient penalty differentiates the critic's gradient.
    allows_mixed_precision = False

    class Options(TrainedDetector.Options):
        image_size: int = option(256, "Square side the images are zoomed to, a multiple of 64 (thesis MVTec AD 256; LOCO 64, with patches null).", ge=PATCH, multiple_of=PATCH)
        patches: int | None = option(50000, "Random 64 x 64 training patches drawn once per fit (thesis 50,000); null: one per training image (the whole image at image_size 64, the thesis' LOCO setup).", ge=1)
        epochs: int = option(100, "GAN epochs over the patches (thesis 100; the official script sets TRAIN_EPOCHS 7).", ge=1)
        encoder_epochs: int = option(64, "Encoder epochs over the patches after the GAN's (official 50,000 iterations of 64 = 64 epochs of 782 batches over 50,000 patches).", ge=1)
        batch_size: int = option(64, "Patches per step of every network (official 64).", ge=1)
        latent_dim: int = option(128, "Latent size of the generator's input and the encoder's output (official 128).", ge=1)
        width: int = option(64, "Base width d of the three networks (official DIM 64: 24.57 M parameters with the BatchNorm statistics; smaller ones for CPU trials).", ge=1)
        critic_iterations: int = option(5, "Critic steps per generator step (official CRITIC_ITERS 5).", ge=1)
        gradient_penalty: float = option(10.0, "Weight of WGAN-GP's gradient penalty (official LAMBDA 10).", ge=0)
        lr: float = option(1e-4, "Adam learning rate of generator and critic, betas (0, 0.9) (official 1e-4).", gt=0)
        encoder_lr: float = option(5e-5, "RMSProp learning rate of the encoder (official 5e-5, TensorFlow's RMSProp).", gt=0)
        kappa: float = option(1.0, "Weight of the critic-feature residual in the encoder loss and the score (official 1.0).", ge=0)
        flip_probability: float = option(0.5, "Chance that a training patch is flipped horizontally (official loader 0.5).", ge=0, le=1)
        stride: int = option(64, "Step between test patches in pixels (thesis 64, no overlap); overlaps average the reconstructions.", ge=1, le=PATCH)
        image_score: Literal["izi_f", "map_max"] = option("izi_f", "izi_f: the official residual per patch, the image's largest; map_max: the maximum of the per-pixel map (thesis' tables).")

    tiny_options = {"image_size": 64, "patches": None, "epochs": 1, "encoder_epochs": 1, "batch_size": 4, "latent_dim": 8, "width": 2, "critic_iterations": 1}
    #: No claim: one epoch of width-2 networks learns nothing to rank by.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        #: True while the shared loop runs on the sampled patches (``check_batch`` lets them through).
        self._patch_training = False
        self._batches_per_epoch = 0
        self._epoch_seen = 0
        self._batch_in_epoch = 0

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs in [0, 1] (mean 0, std 1), bilinear zoom; grey inside."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")

    @property
    def total_epochs(self) -> int:
        """The GAN's epochs, then the encoder's."""
        return self.options.epochs + self.options.encoder_epochs

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Image batches as every image detector's; inside :meth:`fit` the loop is handed the
        8-bit grey patches ``fit`` made, which go to the device as they are."""
        if self._patch_training:
            return batch.to(self.device)
        return super().check_batch(batch, where)

    # ------------------------------------------------------------------ training

    def fit(self, batches: Any) -> None:
        """Draw the training patches from the images, then train the two phases on them."""
        images, _ = self.held_out_split(batches, 0.0)
        patches = self.training_patches(images)
        self._batches_per_epoch = math.ceil(len(patches) / self.options.batch_size)
        self._epoch_seen = 0
        self._patch_training = True
        try:
            train(self, list(patches.split(self.options.batch_size)))
        finally:
            self._patch_training = False

    def training_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``patches`` random 64 x 64 crops (a uniformly chosen image and position each, from
        ``seed``; ``patches=null``: one from each image) as 8-bit grey values ``[M, 1, 64, 64]``."""
        count, _, height, width = images.shape
        generator = torch.Generator().manual_seed(self.options.seed)
        wanted = self.options.patches
        which = torch.arange(count) if wanted is None else torch.randint(count, (wanted,), generator=generator)
        tops = torch.randint(height - PATCH + 1, (len(which),), generator=generator)
        lefts = torch.randint(width - PATCH + 1, (len(which),), generator=generator)
        grey = grey_levels(images)[:, 0]
        offsets = torch.arange(PATCH)
        chunks = []
        for start in range(0, len(which), SAMPLING_CHUNK):
            part = slice(start, start + SAMPLING_CHUNK)
            rows = (tops[part, None] + offsets)[:, :, None]
            columns = (lefts[part, None] + offsets)[:, None, :]
            index = [t.to(grey.device) for t in (which[part, None, None], rows, columns)]
            chunks.append((grey[index[0], index[1], index[2]] * 255).round().clamp(0, 255).to(torch.uint8))
        return torch.cat(chunks).unsqueeze(1)

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Generator, critic and encoder, initialised as ``tflib`` from ``seed`` (the global
        random state is left as it was)."""
        options = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            generator = Generator(options.latent_dim, options.width)
            critic = Critic(options.width)
            encoder = Encoder(options.latent_dim, options.width)
        return {"generator": generator, "critic": critic, "encoder": encoder}

    def minibatch(self) -> int:
        """The official batch size; the patches are reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam (lr, betas (0, 0.9)) for generator and critic, TensorFlow's RMSProp for the encoder."""
        options, networks = self.options, self.networks
        self._optimizers = {
            "generator": torch.optim.Adam(networks["generator"].parameters(), lr=options.lr, betas=ADAM_BETAS),
            "critic": torch.optim.Adam(networks["critic"].parameters(), lr=options.lr, betas=ADAM_BETAS),
            "encoder": official_rmsprop(networks["encoder"].parameters(), options.encoder_lr),
        }
        return list(self._optimizers.values()), []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One critic step (and, every ``critic_iterations``-th, a generator step before it) in
        the GAN's epochs; one encoder step afterwards."""
        assert self._optimizers, "f-anogan trains through fit()"
        patches = self.augment(batch, generator)
        if self.current_epoch <= self.options.epochs:
            return self.gan_step(patches, generator)
        return self.encoder_step(patches)

    def augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """8-bit patches to the official ``2 (x / 255 - 0.5)``, each flipped horizontally with
        ``flip_probability`` (the official loader)."""
        patches = batch.float() / 255 * 2 - 1
        flip = (torch.rand(len(patches), generator=generator) < self.options.flip_probability).to(patches.device)
        return torch.where(flip.view(-1, 1, 1, 1), patches.flip(-1), patches)

    def critic_iteration(self) -> int:
        """The running count of critic iterations (0-based over the GAN's epochs), from the epoch
        and the batch within it, so a fit resumed at an epoch's end counts on the same."""
        if self.current_epoch != self._epoch_seen:
            self._epoch_seen, self._batch_in_epoch = self.current_epoch, 0
        iteration = (self.current_epoch - 1) * self._batches_per_epoch + self._batch_in_epoch
        self._batch_in_epoch += 1
        return iteration

    def gan_step(self, real: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The official loop's unit: a generator step before every ``critic_iterations``-th
        critic step but the first, then the critic step on this batch of real patches."""
        options = self.options
        netg, netd = self.networks["generator"].train(), self.networks["critic"].train()
        parts = {}
        iteration = self.critic_iteration()
        if iteration > 0 and iteration % options.critic_iterations == 0:
            noise = torch.randn(options.batch_size, options.latent_dim, generator=generator).to(real.device)
            with frozen(netd):
                generator_loss = -netd(netg(noise)).mean()
                self.optimizer_step(self._optimizers["generator"], generator_loss)
            parts["generator"] = float(generator_loss.detach())
        noise = torch.randn(len(real), options.latent_dim, generator=generator).to(real.device)
        with torch.no_grad():
            fake = netg(noise)
        alpha = torch.rand(len(real), generator=generator).to(real.device)
        loss, critic_parts = critic_loss(netd, real, fake, alpha, options.gradient_penalty)
        self.optimizer_step(self._optimizers["critic"], loss)
        return loss.detach(), {**critic_parts, **parts}

    def encoder_step(self, patches: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """One RMSProp step of the encoder on the batch mean of the izi_f residual, with the
        generator and the critic frozen and in eval mode (official ``is_training=False``)."""
        netg, netd = self.networks["generator"].eval(), self.networks["critic"].eval()
        encoder = self.networks["encoder"].train()
        with frozen(netg, netd):
            reconstructions = netg(encoder(patches))
            with torch.no_grad():
                features = netd.features(patches)
            residuals = izif_residual(patches, reconstructions, features, netd.features(reconstructions), self.options.kappa)
            loss = residuals.mean()
            self.optimizer_step(self._optimizers["encoder"], loss)
        return loss.detach(), {}

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Per-pixel residual maps ``[B, H, W]`` and image scores ``[B]`` (see ``image_score``)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """The patchwise scorer ``images -> (scores, maps)`` (in eval mode: exporters restore the
        mode they found after tracing)."""
        self.require_fitted()
        options, networks = self.options, self.networks
        return PatchwiseScorer(
            networks["encoder"], networks["generator"], networks["critic"], options.kappa, options.stride, options.batch_size, options.image_score
        ).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> FAnoGanFeatures:
        """The critic's features of the image's 64 px patches as a FeatureSource."""
        return FAnoGanFeatures(self, **options)


class PatchwiseScorer(nn.Module):
    """``images [B, 3, H, W] in [0, 1] -> (scores [B], maps [B, H, W])`` around fitted networks."""

    def __init__(self, encoder: nn.Module, generator: nn.Module, critic: Critic, kappa: float, stride: int, batch_size: int, image_score: str) -> None:
        super().__init__()
        self.encoder, self.generator, self.critic = encoder, generator, critic
        self.kappa, self.stride, self.batch_size, self.image_score = kappa, stride, batch_size, image_score

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct patch by patch; the map is the squared residual, the score the largest
        patch residual (``izi_f``) or the map's maximum (``map_max``)."""
        x = to_model_range(images)
        residuals: list[torch.Tensor] = []

        def reconstruct(patches: torch.Tensor) -> torch.Tensor:
            reconstructions = self.generator(self.encoder(patches))
            if self.image_score == "izi_f":
                features = self.critic.features(torch.cat((patches, reconstructions)))
                residuals.append(izif_residual(patches, reconstructions, *features.chunk(2), self.kappa))
            return reconstructions

        reconstructions = reconstruct_by_patches(x, reconstruct, PATCH, self.stride, self.batch_size)
        maps = (x - reconstructions).square()[:, 0]
        if self.image_score == "map_max":
            return maps.flatten(1).amax(dim=1), maps
        # reconstruct_by_patches hands over the patches position by position, each for the whole batch
        return torch.cat(residuals).view(-1, x.shape[0]).amax(dim=0), maps


class FAnoGanFeatures(DetectorFeatures):
    """f-AnoGAN's critic features as patch features (``--backbone detector:f-anogan``).

    Cut point: the critic's ``f`` (its last residual block, ``8 width`` channels on a 4 x 4 grid
    per 64 x 64 patch), the features whose residual the izi_f score weighs with kappa. The image
    is cut into non-overlapping 64 px patches (``image_size`` is a multiple of 64) and their
    grids are put side by side: ``[B, 8 width, H / 16, W / 16]``. Preprocessing is the detector's.
    """

    name = "f-anogan-features"

    @property
    def out_channels(self) -> int:
        """``8 width``."""
        return 8 * self.detector.options.width

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, 8 width, H / 16, W / 16]``."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        critic = detector.networks["critic"].eval()
        with torch.no_grad():
            x = to_model_range(images)
            count, _, height, width = x.shape
            rows, columns = height // PATCH, width // PATCH
            patches = x.view(count, 1, rows, PATCH, columns, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(-1, 1, PATCH, PATCH)
            features = torch.cat([critic.features(chunk) for chunk in patches.split(detector.options.batch_size)])
            channels, side = features.shape[1], features.shape[-1]
            grid = features.view(count, rows, columns, channels, side, side).permute(0, 3, 1, 4, 2, 5)
            return grid.reshape(count, channels, rows * side, columns * side)


