"""The feature autoencoder (DFR's ``FeatCAE``), its latent-width rule, loss and anomaly map.

Facts from the official code (github.com/YoungGod/DFR, ``DFR-source/feat_cae.py`` and
``anoseg_dfr.py``):

* every layer is a 1x1 convolution with bias, so each grid position is reconstructed from its
  own feature vector; widths ``C -> hidden -> 2L -> L`` (encoder) and ``L -> 2L -> hidden -> C``
  (decoder), BatchNorm + ReLU after every convolution but the last of each half;
* ``hidden = (C + 2L) // 2`` in DFR; seed 003's table fixes it to 400 for ``C = 1536, L = 100``
  (1,434,036 parameters), the only width that differs;
* with no latent width given, DFR fits a PCA on the patch features of the first 10 training
  images and takes the number of components that explain 90 % of the variance
  (``PCA(n_components=0.90)``, scikit-learn's rule: the fewest leading components whose
  cumulative explained-variance ratio exceeds the fraction);
* loss: the mean squared error over every element (``loss_function``); anomaly map: the squared
  error averaged over the channels at each position (``compute_energy``), so the loss is the
  mean of the maps.
"""

from __future__ import annotations

import torch
from torch import nn

from vad.errors import VadError


def dfr_hidden(channels: int, latent: int) -> int:
    """DFR's hidden width between the input and ``2 * latent``: ``(channels + 2 * latent) // 2``."""
    return (channels + 2 * latent) // 2


def _block(inputs: int, outputs: int, activated: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(inputs, outputs, kernel_size=1)]
    return layers + [nn.BatchNorm2d(outputs), nn.ReLU()] if activated else layers


class FeatCAE(nn.Module):
    """1x1-convolution autoencoder ``C -> hidden -> 2L -> L -> 2L -> hidden -> C`` (DFR's ``FeatCAE``
    with BatchNorm, its default ``is_bn=True``)."""

    def __init__(self, channels: int, latent: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_block(channels, hidden, True), *_block(hidden, 2 * latent, True), *_block(2 * latent, latent, False))
        self.decoder = nn.Sequential(*_block(latent, 2 * latent, True), *_block(2 * latent, hidden, True), *_block(hidden, channels, False))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[B, C, h, w]`` of features ``[B, C, h, w]``."""
        return self.decoder(self.encoder(features))


def reconstruction_error(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the channels, ``[B, h, w]`` (DFR's ``compute_energy``)."""
    return (features - reconstruction.float()).pow(2).mean(dim=1)


class FeatureAEHead(nn.Module):
    """Features ``[B, C, h, w]`` -> (image scores ``[B]``: the map maximum, maps ``[B, h, w]``)."""

    def __init__(self, autoencoder: FeatCAE) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = reconstruction_error(features, self.autoencoder(features))
        return maps.flatten(1).amax(dim=1), maps


def pca_latent_dim(patches: torch.Tensor, variance: float) -> int:
    """The number of principal components of ``patches`` ``[N, C]`` whose cumulative explained
    variance ratio first exceeds ``variance`` (scikit-learn's ``PCA(n_components=variance)``)."""
    if patches.ndim != 2 or patches.shape[0] < 2:
        raise VadError(f"the latent-width rule needs at least two patch features [N, C], got {tuple(patches.shape)}")
    centered = patches.double() - patches.double().mean(dim=0)
    spectrum = torch.linalg.svdvals(centered).pow(2)
    total = spectrum.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0:
        raise VadError("feature-ae: the training features do not vary, so no latent width follows from their PCA; set latent_dim")
    ratios = torch.cumsum(spectrum / total, dim=0)
    count = int(torch.searchsorted(ratios, torch.tensor([variance], dtype=ratios.dtype), right=True)) + 1
    return min(count, len(ratios))  # rounding can leave the last ratio just below 1
