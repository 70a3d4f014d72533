"""The numerical core of the GMM texture model, plain torch: the gray image pyramid, patch
features as convolutions, the Gaussian mixture's negative log-likelihood per pixel and the
combination of the pyramid levels. No I/O; :mod:`vad_gmm_texture.detector` fits the mixtures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: ITU-R BT.601 luma weights (HALCON's ``rgb1_to_gray``).
LUMA = (0.299, 0.587, 0.114)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB to ``[B, 1, H, W]`` luma."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def pyramid(gray: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``levels`` images, each the previous one's 2 x 2 block means (level 0: the image itself)."""
    out = [gray]
    for _ in range(levels - 1):
        out.append(F.avg_pool2d(out[-1], 2))
    return out


def patch_features(level: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Features ``[B, d, h, w]`` of the ``p x p`` patch around every pixel of ``[B, 1, h, w]``:
    the patch's gray values (borders mirrored) times ``kernel`` ``[d, 1, p, p]`` plus ``bias``,
    i.e. the (projected) patch vector, standardised when the kernel holds the scaling."""
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(level, (pad, pad, pad, pad), mode="reflect"), kernel, bias)


def mixture_log_density(features: torch.Tensor, transforms: torch.Tensor, offsets: torch.Tensor, log_norms: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` ``[B, h, w]`` of features ``[B, d, h, w]`` under a full-covariance Gaussian
    mixture given per component ``k`` as ``y_k = P_k^T x + c_k`` (``transforms`` ``[K, d, d]``
    holds ``P_k^T``, the transposed Cholesky factor of the precision; ``offsets`` ``[K, d]``
    holds ``c_k = -P_k^T mu_k``) and ``log_norms`` ``[K]`` ``= log w_k + log det P_k - d/2 log 2 pi``:
    ``log p = logsumexp_k(log_norms_k - |y_k|^2 / 2)``. One component at a time, so memory stays
    at one ``[B, d, h, w]`` tensor."""
    terms = []
    for k in range(int(transforms.shape[0])):
        y = F.conv2d(features, transforms[k][:, :, None, None], offsets[k])
        terms.append(log_norms[k] - 0.5 * (y * y).sum(1))
    return torch.logsumexp(torch.stack(terms, 1), 1)


class TextureScorer(nn.Module):
    """The fitted texture model: ``images [B, 3, H, W] in [0, 1] -> (scores [B], maps [B, H, W])``.

    Per pyramid level ``l``: the negative log-likelihood of every pixel's patch under the level's
    mixture, standardised with the level's mean and std on held-out normal images, upsampled
    bilinearly to the input size; the map is the mean over levels, the score its maximum.
    """

    def __init__(
        self,
        kernels: torch.Tensor,
        biases: torch.Tensor,
        means: torch.Tensor,
        precisions_cholesky: torch.Tensor,
        weights: torch.Tensor,
        nll_mean: torch.Tensor,
        nll_std: torch.Tensor,
    ) -> None:
        """``kernels`` ``[L, d, 1, p, p]`` and ``biases`` ``[L, d]`` (standardised patch features),
        the mixtures' ``means`` ``[L, K, d]``, ``precisions_cholesky`` ``[L, K, d, d]`` (as
        scikit-learn's, ``Sigma^-1 = P P^T``) and ``weights`` ``[L, K]``, and the levels' NLL
        statistics ``[L]`` (``nll_std`` may hold zeros before they are known: ``level_nll`` only)."""
        super().__init__()
        dim = int(means.shape[-1])
        transforms = precisions_cholesky.transpose(-1, -2)  # P^T
        self.register_buffer("kernels", kernels)
        self.register_buffer("biases", biases)
        self.register_buffer("transforms", transforms.contiguous())
        self.register_buffer("offsets", -torch.einsum("lkij,lkj->lki", transforms, means))
        log_det = torch.log(torch.diagonal(precisions_cholesky, dim1=-2, dim2=-1)).sum(-1)
        self.register_buffer("log_norms", torch.log(weights) + log_det - 0.5 * dim * math.log(2 * math.pi))
        self.register_buffer("nll_mean", nll_mean)
        self.register_buffer("nll_std", nll_std)
        self.levels = int(kernels.shape[0])

    def level_nll(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The raw negative log-likelihood maps ``[B, h_l, w_l]`` of every level."""
        maps = []
        for index, level in enumerate(pyramid(to_gray(images), self.levels)):
            features = patch_features(level, self.kernels[index], self.biases[index])
            maps.append(-mixture_log_density(features, self.transforms[index], self.offsets[index], self.log_norms[index]))
        return maps

    def combine(self, nll: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """The mean over levels of the standardised maps, each upsampled to ``size`` ``[B, H, W]``."""
        total = None
        for index, level in enumerate(nll):
            standard = (level - self.nll_mean[index]) / self.nll_std[index]
            upsampled = F.interpolate(standard[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            total = upsampled if total is None else total + upsampled
        assert total is not None
        return total / len(nll)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (map maxima) and maps at the input resolution."""
        maps = self.combine(self.level_nll(images), (int(images.shape[-2]), int(images.shape[-1])))
        return maps.flatten(1).amax(1), maps
