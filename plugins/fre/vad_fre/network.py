"""FRE's numerical parts: the shallow linear autoencoders, the PCA that gives them in closed
form, and the reconstruction error as map and score.

Facts from the official code (github.com/IntelLabs/dfm, ``run_mvtec.py`` and
``feature_extractor.py``, the BMVC 2023 version):

* the features of one image are the level's map average-pooled with a ``k x k`` kernel and
  stride ``k`` (``F.avg_pool2d(x, pool_factor)``), flattened channel-major into one vector of
  ``C * h * w`` values (``reshape(B, -1)``);
* ``TiedAE``: ``x_hat = W^T (W x + b_enc) + b_dec`` with ``W`` ``[L, D]`` drawn with Xavier-uniform
  and zero biases; ``AE``: two ``nn.Linear`` layers with PyTorch's default initialisation;
* ``fit_pca``: scikit-learn's ``PCA(0.97)`` on the training vectors, turned into a ``TiedAE`` with
  ``W`` = the components, ``b_dec`` = the mean and ``b_enc = -W mean``, i.e.
  ``x_hat = mean + W^T W (x - mean)``; without ``--proj_size`` the autoencoders get the PCA's
  number of components as their latent width;
* ``score``: ``e = (x - x_hat)^2`` reshaped to ``[B, C, h, w]``, summed over the channels into the
  map and over the map into the image score.

Here the map is the channel **mean** of ``e`` (the paper's ``M_k = 1/C_k sum_c e(c, i, j)``; the
code's channel sum is ``C`` times it, the same ranking) and the score is the paper's FRE, the
l2-norm of ``x - x_hat``: the square root of the code's sum of ``e``, the same ranking on a scale
that float32 exports reproduce to vad's absolute parity tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vad.errors import VadError


def pooled(level: torch.Tensor, kernel: int) -> torch.Tensor:
    """The official feature tensor: ``k x k`` average pooling with stride ``k`` (floor), none for ``k = 1``."""
    return F.avg_pool2d(level, kernel) if kernel > 1 else level


class TiedAE(nn.Module):
    """The official tied shallow linear autoencoder ``x -> W^T (W x + b_enc) + b_dec``
    (parameter names as the official code and anomalib, so weights carry over)."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(latent_dim, input_dim))
        nn.init.xavier_uniform_(self.weight)
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(input_dim))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """The latent code ``[N, L]`` of vectors ``[N, D]``."""
        return F.linear(features, self.weight, self.encoder_bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[N, D]`` of vectors ``[N, D]``."""
        return F.linear(self.encode(features), self.weight.t(), self.decoder_bias)

    @torch.no_grad()
    def set_subspace(self, components: torch.Tensor, mean: torch.Tensor) -> None:
        """The official ``fit_pca`` autoencoder: ``W`` = the orthonormal components ``[L, D]``,
        ``b_dec`` = the mean, ``b_enc = -W mean``, so that ``x_hat = mean + W^T W (x - mean)``."""
        self.weight.copy_(components)
        self.decoder_bias.copy_(mean)
        self.encoder_bias.copy_(-(components @ mean))


class PlainAE(nn.Module):
    """The official untied shallow linear autoencoder (``AE``: ``Linear(D, L)``, ``Linear(L, D)``)."""

    def __init__(self, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(input_dim, latent_dim)
        self.decoder = nn.Linear(latent_dim, input_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[N, D]`` of vectors ``[N, D]``."""
        return self.decoder(self.encoder(features))


def residual(features: torch.Tensor, autoencoder: nn.Module) -> torch.Tensor:
    """The signed reconstruction error ``x - x_hat`` of feature tensors ``[B, C, h, w]``, as a
    tensor of the same shape (each image flattened channel-major, as the official code)."""
    flat = features.flatten(1)
    return (flat - autoencoder(flat)).view(features.shape)


def fre_scores_and_maps(error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``[B]`` (the l2-norm of the error, the paper's FRE; the official
    ``fre_score`` is its square) and maps ``[B, h, w]`` (the channel mean of the squared error,
    the paper's ``M``) of residuals ``[B, C, h, w]``."""
    squared = error.square()
    return squared.flatten(1).sum(dim=1).sqrt(), squared.mean(dim=1)


def explained_count(singular_values: torch.Tensor, variance: float) -> int:
    """scikit-learn's ``PCA(n_components=variance)`` rule: the fewest leading components whose
    cumulative explained-variance ratio exceeds ``variance``."""
    spectrum = singular_values.double().square()
    total = spectrum.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0:
        raise VadError("fre: the training features do not vary (one image, or identical ones), so they span no subspace; use at least two different training images")
    ratios = torch.cumsum(spectrum / total, dim=0)
    count = int(torch.searchsorted(ratios, torch.tensor([variance], dtype=ratios.dtype, device=ratios.device), right=True)) + 1
    return min(count, len(ratios))  # rounding can leave the last ratio just below 1


def principal_subspace(vectors: torch.Tensor, count: int | None, variance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``[D]`` and the leading principal components ``[k, D]`` (orthonormal rows) of
    training vectors ``[N, D]``, computed by an SVD of the centred vectors in float64: ``count``
    components, or with ``count=None`` the number :func:`explained_count` gives for ``variance``."""
    data = vectors.double()
    mean = data.mean(dim=0)
    _, singular_values, right = torch.linalg.svd(data - mean, full_matrices=False)
    if count is None:
        count = explained_count(singular_values, variance)
    elif count > len(singular_values):
        raise VadError(f"fre: {count} principal components were asked for, but {vectors.shape[0]} training vectors of {vectors.shape[1]} values have at most {len(singular_values)}; lower latent_dim")
    return right[:count].float(), mean.float()


class FreScorer(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, h, w])`` module: the frozen backbone's level
    (``encode``), pooled, reconstructed by the autoencoder; maps on the pooled grid."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], kernel: int, autoencoder: nn.Module) -> None:
        super().__init__()
        self.encode, self.kernel, self.autoencoder = encode, kernel, autoencoder

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction error ``[B, C, h, w]`` of the images' pooled features."""
        return residual(pooled(self.encode(images), self.kernel), self.autoencoder)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`vad_fre.detector.Fre.predict`."""
        return fre_scores_and_maps(self.residual(images))
