"""Pooled deep features per image and their PCA: the part DFM and DFKDE share.

Both methods turn the feature grid of each image into one vector (DFM: ``k x k`` average
pooling, then flattening; DFKDE: the global average of every channel) and fit one PCA on the
training images' vectors. Plain torch, CPU or CUDA.

The PCA is the thin SVD of the centred ``[N, D]`` training matrix in float64 (``N`` images,
``D`` pooled features; usually ``N << D``, so no ``D x D`` covariance is formed), as anomalib's
``PCA`` computes it. The number of components is either a count or the fewest leading
components whose cumulative share of the variance reaches a level (``pca_level``), never more
than the directions the training vectors actually span (at most ``N - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vad.errors import VadError

#: A cumulative variance share this close below the level counts as reaching it (the features
#: are float32, so shares carry errors of about 1e-7).
LEVEL_TOLERANCE = 1e-6


def check_grid(features: object, owner: str, where: str) -> torch.Tensor:
    """``features`` as a detached float32 grid ``[B, C, h, w]``, or a VadError naming ``owner``."""
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise VadError(f"{owner}.{where} expects feature grids [B, C, h, w] from a feature source, got {shape}")
    if min(features.shape[1:]) < 1:
        raise VadError(f"{owner}.{where}: the feature grid {tuple(features.shape[1:])} is empty; use larger images or shallower layers")
    return features.detach().float()


def pooled_grid(features: torch.Tensor, kernel: int | None) -> torch.Tensor:
    """Average pooling of a grid ``[B, C, h, w]``: ``kernel x kernel`` windows with stride
    ``kernel`` (partial windows at the right and bottom edges dropped, as ``F.avg_pool2d``),
    ``kernel=1`` unchanged, ``kernel=None`` the global average ``[B, C, 1, 1]``."""
    if kernel is None:
        return features.mean((2, 3), keepdim=True)
    if kernel == 1:
        return features
    return F.avg_pool2d(features, kernel)


def pooled_shape(grid: tuple[int, int, int], kernel: int | None, owner: str) -> tuple[int, int, int]:
    """``(C, h', w')`` of :func:`pooled_grid` for an input grid ``(C, h, w)``; a VadError when the
    grid is smaller than the pooling window."""
    channels, height, width = grid
    if kernel is None:
        return channels, 1, 1
    if min(height, width) < kernel:
        raise VadError(
            f"{owner}: the feature grid is {height}x{width}, smaller than the {kernel}x{kernel} pooling window; "
            f"use larger images, a shallower layer or a smaller pooling_kernel_size"
        )
    return channels, height // kernel, width // kernel


def collect_vectors(batches: Iterable[torch.Tensor], kernel: int | None, owner: str, device: torch.device) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The pooled, flattened vectors ``[N, D]`` of every training grid (float32, on ``device``) and
    the grid shape ``(C, h, w)`` they came from; every batch must have that shape."""
    vectors: list[torch.Tensor] = []
    grid: tuple[int, int, int] | None = None
    for batch in batches:
        features = check_grid(batch, owner, "fit").to(device)
        shape = (int(features.shape[1]), int(features.shape[2]), int(features.shape[3]))
        if grid is None:
            grid = shape
            pooled_shape(grid, kernel, owner)
        elif shape != grid:
            raise VadError(
                f"{owner}: training feature grids changed from {grid[0]} channels on {grid[1:]} to {shape[0]} on {shape[1:]} "
                "between batches: every image must have the same size"
            )
        vectors.append(pooled_grid(features, kernel).flatten(1))
    if grid is None:
        raise VadError(f"{owner} got an empty training set: it needs normal training images")
    return torch.cat(vectors), grid


@dataclass
class PCA:
    """A fitted PCA of image vectors.

    ``mean [D]``, ``components [D, k]`` (orthonormal columns, by decreasing variance) and
    ``variances [k]``: the variances of the training vectors along the components, normalised by
    ``N`` (the maximum-likelihood estimate, ``S_i^2 / N`` for singular values ``S_i``).
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor

    @classmethod
    def fit(cls, vectors: torch.Tensor, *, components: int | None = None, level: float | None = None, owner: str = "PCA") -> PCA:
        """Fit on ``vectors [N, D]`` keeping ``components`` components, or the fewest whose
        cumulative share of the variance reaches ``level`` (exactly one of the two)."""
        if (components is None) == (level is None):
            raise ValueError("give exactly one of components and level")
        count = int(vectors.shape[0])
        if count < 2:
            raise VadError(f"{owner} fits a PCA on the training images' features and needs at least 2 images, got {count}")
        data = vectors.to(torch.float64)
        mean = data.mean(0)
        _, singular, right = torch.linalg.svd(data - mean, full_matrices=False)
        # directions the sample spans (numpy.linalg.matrix_rank's tolerance); at most N - 1 after centring
        spanned = min(int((singular > singular[0] * max(data.shape) * torch.finfo(torch.float64).eps).sum()), count - 1)
        if spanned == 0:
            raise VadError(f"{owner}: the training images' features do not vary, so there is no principal component to fit")
        if components is not None:
            if components > spanned:
                raise VadError(
                    f"{owner}: {components} principal components asked, but the {count} training images' features span only "
                    f"{spanned} directions (at most one fewer than the images); use at most {spanned} components or more training images"
                )
            keep = components
        else:
            share = singular.square() / singular.square().sum()
            reached = torch.cumsum(share, 0) >= level - LEVEL_TOLERANCE  # type: ignore[operator]
            keep = min(int(torch.nonzero(reached)[0]) + 1, spanned)
        return cls(
            mean=mean.float(),
            components=right[:keep].T.float().contiguous(),
            variances=(singular[:keep].square() / count).float(),
        )

    @property
    def count(self) -> int:
        """k, the number of kept components."""
        return int(self.components.shape[1])

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Coordinates ``[B, k]`` of ``vectors [B, D]`` along the components."""
        return (vectors - self.mean) @ self.components

    def residual(self, vectors: torch.Tensor) -> torch.Tensor:
        """``x_c - V V^T x_c`` for the centred ``x_c``: what the components do not reconstruct, ``[B, D]``."""
        centred = vectors - self.mean
        return centred - (centred @ self.components) @ self.components.T

    def gaussian_nll(self, vectors: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood ``[B]`` of the coordinates under the Gaussian fitted to the training
        coordinates (zero mean, diagonal covariance ``diag(variances)``): ``0.5 * (sum z_i^2 / l_i +
        sum log l_i + k log 2 pi)``."""
        coordinates = self.project(vectors)
        constant = 0.5 * (self.variances.log().sum() + self.count * math.log(2 * math.pi))
        return 0.5 * (coordinates.square() / self.variances).sum(1) + constant

    def to(self, device: torch.device | str) -> PCA:
        """The same PCA on ``device``."""
        return PCA(self.mean.to(device), self.components.to(device), self.variances.to(device))

    def tensors(self, prefix: str = "pca") -> dict[str, torch.Tensor]:
        """Named CPU tensors for a saved state."""
        return {f"{prefix}.{name}": getattr(self, name).detach().cpu().contiguous() for name in ("mean", "components", "variances")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], owner: str, prefix: str = "pca") -> PCA:
        """Inverse of :meth:`tensors`, with shapes checked; a VadError names what is missing or wrong."""
        names = ("mean", "components", "variances")
        missing = [f"{prefix}.{name}" for name in names if f"{prefix}.{name}" not in tensors]
        if missing:
            raise VadError(f"the saved {owner} state lacks tensor(s) {', '.join(missing)}; the model folder is damaged, refit the model")
        mean, components, variances = (tensors[f"{prefix}.{name}"].float() for name in names)
        if mean.ndim != 1 or components.ndim != 2 or components.shape[0] != mean.shape[0] or tuple(variances.shape) != (components.shape[1],):
            raise VadError(
                f"the saved {owner} PCA tensors have shapes {tuple(mean.shape)}, {tuple(components.shape)} and {tuple(variances.shape)}, "
                "which do not fit together; the model folder is damaged"
            )
        return cls(mean, components, variances)
