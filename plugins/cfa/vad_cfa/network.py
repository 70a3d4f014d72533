"""CFA's numerical heart (Lee, Lee, Song, IEEE Access 2022): descriptor, memory bank, loss, score.

Plain torch (and scikit-learn's k-means for a compressed bank), free of I/O. It follows the
official ``utils/cfa.py`` and ``utils/coordconv.py`` (github.com/sungwool/CFA_for_anomaly_localization):

* patch descriptor (:class:`Descriptor`): every backbone level is averaged over its 3 x 3
  neighbourhood (``avg_pool2d(3, 1, 1)``, zero padding counted), resized bilinearly
  (``align_corners=False``) to the first level's grid and concatenated shallow to deep; a 1 x 1
  CoordConv (the grid's row and column coordinates in [-1, 1] appended as two channels) maps the
  ``C`` channels to ``C // gamma_d``;
* memory bank (:func:`initial_bank`): the descriptor's (randomly initialised) output averaged
  over the training images at each grid position, one centroid per position (``h w`` of them),
  or, with ``gamma_c > 1``, ``h w // gamma_c`` k-means centres of those; it never trains;
* squared distances ``||phi - c||^2`` of every patch to every centroid by the expansion
  ``|phi|^2 + |c|^2 - 2 phi.c`` (:func:`squared_distances`);
* the loss (:func:`cfa_loss`) on the squared distances ``d_1 <= d_2 <= ...`` of each patch to
  its nearest centroids, with the learnable radius ``r``:
  ``1/nu [mean_{patches, k<=K} max(0, d_k - r^2) + mean_{patches, K<j<=K+J} max(0, r^2 - d_j - alpha)]``
  (attraction to the K nearest, repulsion from the J hard negatives after them);
* the patch score (:func:`patch_scores`) on the Euclidean distances ``e_1 <= ... <= e_K`` to the
  K nearest: ``softmin(e_1..e_K)_1 * e_1``; the image score (:class:`CfaScorer`) is the maximum
  of that map upsampled bilinearly to the input size and smoothed by a Gaussian of sigma 4 px
  (the official ``upsample`` + ``gaussian_smooth`` + ``cal_img_roc``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vad.postprocess import upsample_and_blur


def coordinate_channels(features: torch.Tensor) -> torch.Tensor:
    """``[B, 2, h, w]``: the row coordinate then the column coordinate of each grid cell, from -1
    (first) to 1 (last), as the official ``AddCoords`` (a one-cell axis gets -1 where the official
    division by zero gives NaN)."""
    height, width = (int(n) for n in features.shape[-2:])
    rows = torch.arange(height, dtype=features.dtype, device=features.device) / max(height - 1, 1) * 2 - 1
    cols = torch.arange(width, dtype=features.dtype, device=features.device) / max(width - 1, 1) * 2 - 1
    grid = torch.stack([rows[:, None].expand(height, width), cols[None, :].expand(height, width)])
    return grid[None].expand(features.shape[0], -1, -1, -1)


class CoordConv(nn.Module):
    """A 1 x 1 convolution over the features and their two coordinate channels (official
    ``CoordConv2d(in, out, 1)`` with ``with_r=False``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([features, coordinate_channels(features)], dim=1))


def patch_features(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """The levels, each 3 x 3 average-pooled, resized to the first level's grid and concatenated
    along the channels (the official ``Descriptor.forward`` before its CoordConv)."""
    pooled = [F.avg_pool2d(level, 3, 1, 1) for level in levels]
    grid = tuple(int(n) for n in pooled[0].shape[-2:])
    resized = [level if tuple(level.shape[-2:]) == grid else F.interpolate(level, size=grid, mode="bilinear", align_corners=False) for level in pooled]
    return torch.cat(resized, dim=1)


class Descriptor(nn.Module):
    """CFA's trainable patch descriptor: :func:`patch_features`, then a 1 x 1 CoordConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layer = CoordConv(in_channels, out_channels)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, out_channels, h, w]`` on the first level's grid."""
        return self.layer(patch_features(levels))


def squared_distances(descriptors: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``[B, h w, N]``: squared Euclidean distance of every patch descriptor (``[B, D, h, w]``,
    positions in row-major order) to every centroid of ``bank`` (``[N, D]``), expanded as the
    official code (``|phi|^2 + |c|^2 - 2 phi.c``; it can dip a little below 0 by rounding)."""
    patches = descriptors.flatten(2).transpose(1, 2)
    return patches.pow(2).sum(dim=2, keepdim=True) + bank.pow(2).sum(dim=1)[None, None] - 2 * patches @ bank.T


def cfa_loss(distances: torch.Tensor, radius: torch.Tensor, neighbours: int, hard_negatives: int, nu: float, margin: float) -> torch.Tensor:
    """The soft-boundary loss of squared distances ``[B, P, N]`` (see the module docstring):
    attraction of each patch's ``neighbours`` nearest centroids into the hypersphere of radius
    ``radius``, repulsion of the ``hard_negatives`` next ones beyond ``radius^2 - margin``, each
    averaged over patches and centroids and weighted by ``1 / nu``."""
    nearest = distances.topk(neighbours + hard_negatives, dim=-1, largest=False).values
    attraction = torch.clamp(nearest[..., :neighbours] - radius**2, min=0).mean()
    repulsion = torch.clamp(radius**2 - nearest[..., neighbours:] - margin, min=0).mean()
    return (attraction + repulsion) / nu


def patch_scores(distances: torch.Tensor, neighbours: int) -> torch.Tensor:
    """``[B, P]``: each patch's Euclidean distance to its nearest centroid weighted by that
    centroid's softmin share among the ``neighbours`` nearest (official ``DSVDD.forward``; the
    squared distances are clamped at 0 before the square root, where the official code can
    give NaN)."""
    nearest = distances.clamp(min=0).sqrt().topk(neighbours, dim=-1, largest=False).values
    return F.softmin(nearest, dim=-1)[..., 0] * nearest[..., 0]


def mean_descriptor(descriptor: Descriptor, batches: Iterable[list[torch.Tensor]]) -> torch.Tensor:
    """``[D, h, w]``: the descriptor's output averaged over every training image (official
    ``_init_centroid``, a running mean of batch means, equal for its equal-sized batches)."""
    total, count = None, 0
    with torch.no_grad():
        for levels in batches:
            output = descriptor([level.float() for level in levels])
            total = output.sum(dim=0) if total is None else total + output.sum(dim=0)
            count += output.shape[0]
    if total is None:
        raise ValueError("mean_descriptor needs at least one batch")
    return total / count


def initial_bank(mean: torch.Tensor, gamma_c: int, seed: int) -> torch.Tensor:
    """``[N, D]`` centroids from the mean descriptor map ``[D, h, w]``: its ``h w`` positions in
    row-major order (``gamma_c = 1``), or ``h w // gamma_c`` k-means centres of them (official:
    scikit-learn ``KMeans(max_iter=3000)``, k-means++; here with ``n_init=10``, its default when
    the official code was written, and ``random_state=seed`` for a reproducible fit)."""
    positions = mean.flatten(1).T.contiguous()
    if gamma_c == 1:
        return positions
    from sklearn.cluster import KMeans

    clusters = positions.shape[0] // gamma_c
    kmeans = KMeans(n_clusters=clusters, max_iter=3000, n_init=10, random_state=seed).fit(positions.detach().cpu().numpy())
    return torch.as_tensor(kmeans.cluster_centers_, dtype=positions.dtype, device=positions.device)


@functools.lru_cache(maxsize=32)
def smoothed_maxima(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``[B]``: the maximum of each map ``[B, h, w]`` upsampled bilinearly to ``size`` and smoothed
    as the official ``gaussian_smooth`` (scipy ``gaussian_filter``, radius ``int(4 sigma + 0.5)``,
    mirrored borders): vad's own map post-processing, constant matrices in an ONNX trace."""
    return upsample_and_blur(maps, size, float(sigma)).flatten(1).amax(dim=1)


class CfaHead(nn.Module):
    """The trainable part (descriptor and radius ``r``) and the fixed memory bank (a buffer)."""

    def __init__(self, in_channels: int, out_channels: int, bank_size: int, radius: float) -> None:
        super().__init__()
        self.descriptor = Descriptor(in_channels, out_channels)
        self.radius = nn.Parameter(torch.full((1,), float(radius)))
        self.register_buffer("bank", torch.zeros(bank_size, out_channels))

    def distances(self, levels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The descriptors ``[B, D, h, w]`` of the backbone levels and their squared distances
        ``[B, h w, N]`` to the bank, in float32."""
        descriptors = self.descriptor([level.float() for level in levels])
        return descriptors, squared_distances(descriptors, self.bank)

    def score_map(self, levels: Sequence[torch.Tensor], neighbours: int) -> torch.Tensor:
        """``[B, h, w]``: :func:`patch_scores` on the descriptor grid."""
        descriptors, distances = self.distances(levels)
        return patch_scores(distances, neighbours).unflatten(1, tuple(int(n) for n in descriptors.shape[-2:]))


class CfaScorer(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, h, w])`` module: the frozen backbone's levels
    (``encode``), the head's score map on the descriptor grid, and as image score the maximum of
    that map upsampled to the input size and smoothed by a Gaussian of ``sigma`` input pixels."""

    def __init__(self, encode: Callable[[torch.Tensor], list[torch.Tensor]], head: CfaHead, neighbours: int, sigma: float) -> None:
        super().__init__()
        self.encode, self.head = encode, head
        self.neighbours, self.sigma = neighbours, sigma

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.head.score_map(self.encode(images), self.neighbours)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        return smoothed_maxima(maps, size, self.sigma), maps
