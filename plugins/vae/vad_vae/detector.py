"""The variational autoencoder of Bergmann's thesis as a vad image detector (``--detector vae``).

The thesis evaluates a VAE [Kingma & Welling 2014] next to its autoencoders twice: in Ch. 3
(textures, NanoTWICE: the Table 3.1 network, scored by the per-pixel reconstruction probability
[An & Cho 2015] of six latent samples decoded from the approximate posterior) and in Ch. 6
(MVTec LOCO: the Table 6.3 network, "the last convolution layer of the encoder is duplicated to
estimate the variance", scored by a pixelwise comparison of input and reconstruction). MVTec
released no code; the thesis text is the reference. The network, the augmented sample set, the
patchwise maps, the features and the export are the ``autoencoder`` detector's
(:class:`vad_autoencoder.detector.AutoencoderBase`); this module adds the posterior, the loss and
the score.

**Default: the Ch. 3 variant.** It is the one whose scoring the thesis specifies (the
reconstruction probability, which Ch. 6 drops for the autoencoder's residual), and it shares the
autoencoder's Table 3.1 network; on its protocol: 10,000 random 128 x 128 patches of images
downscaled to 256 x 256, latent ``d = 100`` (textures), 200 epochs of Adam (lr 2e-4, weight decay
1e-5), batch 64; at inference 128 px patches at stride 30 with averaged reconstructed pixel
values, six posterior samples, and an opening with a disk of diameter 4. The Ch. 6 variant:
``architecture=loco image_size=256 patch_size=null latent_dim=32 epochs=500 lr=1e-4
batch_size=16 score=l2 opening=0`` (flips where the category allows).

The model:

* encoder: the autoencoder's, with its latent convolution duplicated: one copy predicts the
  posterior mean ``mu``, the other ``log sigma^2`` (the log keeps the variance positive);
* decoder: the autoencoder's, a Gaussian likelihood with mean ``x^ = Dec(z)`` and a fixed
  variance of 1/2, so that its negative log-likelihood is the autoencoder's loss (thesis eq. 3.2,
  the sum of squared errors) up to a constant;
* loss: ``1/B sum_i [ ||x_i - Dec(z_i)||^2 + kl_weight * KL(N(mu_i, sigma_i^2) || N(0, I)) ]``
  with one reparametrised sample ``z_i = mu_i + sigma_i * eps`` per training sample. With
  ``kl_weight = 1`` (default) this is the negative ELBO; the thesis states no weight.
* score (``score=reconstruction-probability``): ``L = samples`` latents ``z_l = mu + sigma
  eps_l`` decoded, and per pixel ``-log (1/L sum_l N(x(p); x^_l(p), 1/2 I))`` (An & Cho's
  reconstruction probability, as a negative log so that higher is more anomalous; the density is
  over the pixel's channels). ``score=l2`` (Ch. 6): the autoencoder's squared-L2 map of the
  posterior mean's reconstruction. The image score is the map's maximum.

Choices where the thesis is silent: the ``eps_l`` of the score are drawn once from ``seed`` and
stored with the model (``posterior_noise``), so predictions are deterministic, independent of
the batch, and exportable; the decoder variance and KL weight as above. The autoencoder's
choices (augmentation, patches, the opening, vad's blur, training through the shared loop) hold
here too. bfloat16 autocast on CUDA is allowed: the networks run in bfloat16, the loss and the
score in float32.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from vad.options import option
from vad_autoencoder.detector import AutoencoderBase, PatchwiseScorer
from vad_autoencoder.network import ConvAutoencoder, l2_map

#: The decoder's fixed per-pixel variance: its negative log-likelihood is the sum of squared
#: errors (thesis eq. 3.2) plus a constant.
DECODER_VARIANCE = 0.5


class VariationalAutoencoder(ConvAutoencoder):
    """The autoencoder with its latent convolution duplicated to predict ``log sigma^2``, and
    fixed standard normal draws ``posterior_noise [samples, d]`` for scoring."""

    def __init__(self, side: int, channels: int, latent_dim: int, architecture: Literal["thesis", "loco"], samples: int) -> None:
        super().__init__(side, channels, latent_dim, architecture)
        self.log_variance = nn.Conv2d(self.bottleneck.in_channels, latent_dim, self.bottleneck.kernel_size)
        self.register_buffer("posterior_noise", torch.randn(samples, latent_dim))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log sigma^2)``, each ``[B, d, 1, 1]``."""
        hidden = self.encoder(images)
        return self.bottleneck(hidden), self.log_variance(hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction of the posterior mean."""
        return self.decode(self.posterior(images)[0])

    def posterior_samples(self, images: torch.Tensor) -> torch.Tensor:
        """``[samples, B, C, H, W]``: the decoded latents ``mu + sigma eps_l``."""
        mean, log_variance = self.posterior(images)
        noise = self.posterior_noise.view(-1, 1, mean.shape[1], 1, 1).to(mean.dtype)
        latents = mean.unsqueeze(0) + torch.exp(0.5 * log_variance).unsqueeze(0) * noise
        decoded = self.decode(latents.flatten(0, 1))
        return decoded.view(noise.shape[0], -1, *decoded.shape[1:])


def kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, I))`` per sample, ``[B]``."""
    return -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).flatten(1).sum(1)


def reconstruction_log_probability(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """``log (1/L sum_l N(x(p); x^_l(p), DECODER_VARIANCE I))`` per pixel, ``[B, H, W]``, for
    ``images [B, C, H, W]`` and ``reconstructions [L, B, C, H, W]`` (float32)."""
    channels, samples = images.shape[1], reconstructions.shape[0]
    squared = (images.unsqueeze(0) - reconstructions).pow(2).sum(2)
    log_densities = -squared / (2 * DECODER_VARIANCE) - 0.5 * channels * math.log(2 * math.pi * DECODER_VARIANCE)
    return torch.logsumexp(log_densities, dim=0) - math.log(samples)


class Vae(AutoencoderBase):
    """The thesis' VAE: Gaussian posterior, reconstruction-probability maps."""

    name = "vae"

    class Options(AutoencoderBase.Options):
        patch_size: int | None = option(128, "null: whole images (Ch. 6); a side (power of two >= 32): patches of it train and are reconstructed at patch_stride (Ch. 3: 128).", ge=32)
        patch_stride: int = option(30, "Stride of the patches at inference (thesis Ch. 3: 30).", ge=1)
        patch_average: Literal["maps", "reconstructions"] = option("reconstructions", "Where patches overlap, average their reconstructions (Ch. 3) or their anomaly maps.")
        latent_dim: int = option(100, "Latent dimension d (Ch. 3: 100 for textures, 500 for NanoTWICE; Ch. 6: 32).", ge=1)
        epochs: int = option(200, "Passes over the augmented sample set (thesis Ch. 3: 200; Ch. 6: 500).", ge=1)
        batch_size: int = option(64, "Samples per Adam step, reshuffled every epoch (thesis Ch. 3: 64; Ch. 6: 16).", ge=1)
        opening: int = option(4, "Grayscale opening of the map with a disk of this diameter in px, the same as opening every thresholded segmentation (Ch. 3: 4; 0: none).", ge=0)
        kl_weight: float = option(1.0, "Weight of the KL term (1: the negative ELBO; the thesis states none).", ge=0)
        samples: int = option(6, "Posterior samples decoded for the reconstruction probability (thesis Ch. 3: 6).", ge=1)
        score: Literal["reconstruction-probability", "l2"] = option("reconstruction-probability", "reconstruction-probability: -log of the mean per-pixel likelihood of the samples (Ch. 3); l2: squared error of the posterior mean's reconstruction (Ch. 6).")

    tiny_options = {"image_size": 32, "patch_size": 32, "patch_stride": 32, "latent_dim": 16, "training_samples": 8, "batch_size": 4, "epochs": 1, "samples": 2}
    #: Two Adam steps learn nothing to rank by.
    tiny_image_auroc = None

    def make_network(self) -> nn.Module:
        """The autoencoder's network with the duplicated latent convolution."""
        options = self.options
        return VariationalAutoencoder(self.network_side, self.channels, options.latent_dim, options.architecture, options.samples)

    def training_loss(self, model: nn.Module, samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The negative ELBO (``kl_weight`` on the KL term) with one posterior sample per input,
        in float32 outside autocast."""
        mean, log_variance = model.posterior(samples)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
        reconstructions = model.decode(mean + torch.exp(0.5 * log_variance) * noise)
        with torch.autocast(samples.device.type, enabled=False):
            squared = (samples.float() - reconstructions.float()).pow(2).flatten(1).sum(1)
            kl = kl_divergence(mean.float(), log_variance.float())
            return (squared + self.options.kl_weight * kl).mean()

    def scorer(self) -> VaeScorer:
        """Posterior samples and their reconstruction probability (or the posterior mean's L2)."""
        return VaeScorer(self.networks["model"], self.options.score, self.options.samples, **self.scorer_options())


class VaeScorer(PatchwiseScorer):
    """The VAE's maps: ``-log`` reconstruction probability of ``samples`` posterior samples, or
    the squared L2 residual of the posterior mean's reconstruction."""

    def __init__(self, model: nn.Module, score: str, samples: int, **options: Any) -> None:
        super().__init__(model, **options)
        self.score = score
        self.samples = samples if score == "reconstruction-probability" else 1

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``[samples, N, C, h, w]`` posterior-sample reconstructions (or ``[1, ...]``: the mean's)."""
        if self.score == "l2":
            return self.model(x).unsqueeze(0)
        return self.model.posterior_samples(x)

    def residual(self, x: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """The anomaly map ``[N, h, w]`` (float32)."""
        x, reconstructions = x.float(), reconstructions.float()
        if self.score == "l2":
            return l2_map(x, reconstructions[0])
        return -reconstruction_log_probability(x, reconstructions)
