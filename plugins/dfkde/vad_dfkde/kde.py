"""Gaussian kernel density estimation with Scott's bandwidth rule, in plain torch.

The estimate is ``scipy.stats.gaussian_kde``'s (and anomalib's ``GaussianKDE``'s): for ``n``
training points in ``d`` dimensions, one Gaussian kernel per point with covariance
``H = f^2 * Sigma``, where ``Sigma`` is the unbiased covariance of the training points and
``f = n ** (-1 / (d + 4))`` is Scott's factor; the density is the mean of the kernels.

Log-densities are computed as a log-sum-exp of the kernels' exponents, so they stay finite
far from the training points, where the kernels themselves underflow (anomalib sums the kernels
in float32: beyond a squared whitened distance of about 200 from every point the density is 0
and its log is ``-inf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vad.errors import VadError


def scott_factor(count: int, dimensions: int) -> float:
    """Scott's rule: the bandwidth factor ``count ** (-1 / (dimensions + 4))``."""
    return count ** (-1.0 / (dimensions + 4))


@dataclass
class GaussianKDE:
    """A fitted KDE: ``center [d]`` (the training mean), ``whitening [d, d]`` (``x -> x @ whitening``
    turns the kernel covariance into the identity), the whitened centred training points ``[n, d]``
    and ``log_normaliser`` (``-log n - d/2 log 2 pi - 1/2 log det H``, a 0-d tensor)."""

    center: torch.Tensor
    whitening: torch.Tensor
    points: torch.Tensor
    log_normaliser: torch.Tensor

    @classmethod
    def fit(cls, points: torch.Tensor, owner: str = "KDE") -> GaussianKDE:
        """Fit on ``points [n, d]`` with Scott's bandwidth (the covariance in float64)."""
        count, dimensions = (int(v) for v in points.shape)
        if count <= dimensions:
            raise VadError(f"{owner}: a Gaussian KDE in {dimensions} dimensions needs more than {dimensions} training points, got {count}")
        data = points.to(torch.float64)
        center = data.mean(0)
        bandwidth = torch.cov(data.T).reshape(dimensions, dimensions) * scott_factor(count, dimensions) ** 2
        lower, info = torch.linalg.cholesky_ex(bandwidth)
        if int(info) != 0:
            raise VadError(
                f"{owner}: the training features do not vary in every one of their {dimensions} dimensions, so the KDE bandwidth "
                "is singular; use fewer PCA components or more (and more varied) training images"
            )
        identity = torch.eye(dimensions, dtype=torch.float64, device=data.device)
        whitening = torch.linalg.solve_triangular(lower, identity, upper=False).T  # L^-T: H^-1 = L^-T L^-1
        log_normaliser = -math.log(count) - 0.5 * dimensions * math.log(2 * math.pi) - lower.diagonal().log().sum()
        return cls(
            center=center.float(),
            whitening=whitening.float().contiguous(),
            points=((data - center) @ whitening).float().contiguous(),
            log_normaliser=log_normaliser.float(),
        )

    def log_density(self, queries: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` for ``queries [B, d]``: ``[B]``."""
        whitened = (queries - self.center) @ self.whitening
        squared = whitened.square().sum(1, keepdim=True) + self.points.square().sum(1) - 2 * whitened @ self.points.T
        return torch.logsumexp(-0.5 * squared.clamp_min(0), 1) + self.log_normaliser

    def to(self, device: torch.device | str) -> GaussianKDE:
        """The same KDE on ``device``."""
        return GaussianKDE(*(t.to(device) for t in (self.center, self.whitening, self.points, self.log_normaliser)))

    def tensors(self, prefix: str = "kde") -> dict[str, torch.Tensor]:
        """Named CPU tensors for a saved state."""
        names = ("center", "whitening", "points", "log_normaliser")
        return {f"{prefix}.{name}": getattr(self, name).detach().cpu().contiguous() for name in names}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], owner: str, prefix: str = "kde") -> GaussianKDE:
        """Inverse of :meth:`tensors`, with shapes checked."""
        names = ("center", "whitening", "points", "log_normaliser")
        missing = [f"{prefix}.{name}" for name in names if f"{prefix}.{name}" not in tensors]
        if missing:
            raise VadError(f"the saved {owner} state lacks tensor(s) {', '.join(missing)}; the model folder is damaged, refit the model")
        center, whitening, points, log_normaliser = (tensors[f"{prefix}.{name}"].float() for name in names)
        dimensions = center.shape[0] if center.ndim == 1 else -1
        if tuple(whitening.shape) != (dimensions, dimensions) or points.ndim != 2 or points.shape[1] != dimensions or log_normaliser.ndim != 0:
            raise VadError(f"the saved {owner} KDE tensors do not fit together; the model folder is damaged")
        return cls(center, whitening, points, log_normaliser)
