"""Per-position multivariate Gaussians and Mahalanobis distances: PaDiM's numerical core.

Plain torch functions and one accumulator class, free of I/O, so they can be tested against a
direct NumPy / SciPy computation.

Streaming fit. The official code (xiahaifeng1995/PaDiM-Anomaly-Detection-Localization) stacks
every training embedding ``[N, d, h*w]`` and calls ``np.cov`` per position; anomalib stacks them
too. :class:`GaussianAccumulator` instead keeps, per position ``p``, the count ``n``, the sum
``S_p = sum_i x_ip`` and the sum of outer products ``Q_p = sum_i x_ip x_ip^T`` in float64, so no
training feature is held after its batch. The unbiased covariance is then::

    Sigma_p = (Q_p - n * mu_p mu_p^T) / (n - 1) + eps * I,     mu_p = S_p / n

which is ``np.cov(X_p, rowvar=False) + eps * I`` exactly as the official code computes it
(``eps = 0.01``). float64 keeps the cancellation in ``Q_p - n mu mu^T`` harmless for feature
magnitudes of CNN activations.
"""

from __future__ import annotations

import torch

from vad.errors import VadError

#: Positions inverted at once (bounds the float64 temporaries of :meth:`GaussianAccumulator.finish`).
INVERSE_CHUNK = 256
#: Positions scored at once in :func:`mahalanobis_map` (bounds its ``[P, B, d]`` temporaries).
SCORE_CHUNK = 1024


class GaussianAccumulator:
    """Running float64 sums of ``x`` and ``x x^T`` per grid position.

    Memory: ``8 * P * d * (d + 1)`` bytes for ``P = h * w`` positions and ``d`` channels.
    """

    def __init__(self, positions: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.positions, self.dim = positions, dim
        self.count = 0
        self.sums = torch.zeros(positions, dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(positions, dim, dim, dtype=torch.float64, device=device)

    def update(self, embeddings: torch.Tensor) -> None:
        """Add a batch of embeddings ``[B, d, h, w]`` (``h * w == positions``)."""
        batch, dim = embeddings.shape[:2]
        # contiguous: bmm on a position-strided view is far slower on CPU
        x = embeddings.reshape(batch, dim, -1).permute(2, 0, 1).to(self.sums.device, torch.float64).contiguous()  # [P, B, d]
        self.sums += x.sum(1)
        self.outer.baddbmm_(x.transpose(1, 2), x)  # Q_p += X_p^T X_p
        self.count += batch

    def finish(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``[P, d]`` and inverse regularised covariances ``[P, d, d]``, both float32.

        Frees the accumulator's sums. Needs at least two samples (unbiased covariance).
        """
        if self.count < 2:
            raise VadError(
                f"PaDiM estimates a covariance per position from the training images and needs at least "
                f"2 of them, got {self.count}; add normal training images"
            )
        n = self.count
        mean = self.sums / n
        identity = torch.eye(self.dim, dtype=torch.float64, device=self.sums.device)
        inverse = torch.empty(self.positions, self.dim, self.dim, dtype=torch.float32, device=self.sums.device)
        for start in range(0, self.positions, INVERSE_CHUNK):
            stop = min(start + INVERSE_CHUNK, self.positions)
            mu = mean[start:stop]
            covariance = (self.outer[start:stop] - n * mu[:, :, None] * mu[:, None, :]) / (n - 1) + eps * identity
            # SPD by construction (eps > 0): Cholesky is the stable way to invert it.
            factor, info = torch.linalg.cholesky_ex(covariance)
            if bool((info != 0).any()):
                raise VadError(
                    "a per-position covariance is not positive definite (non-finite features?); check "
                    "the feature source's output, or raise the PaDiM hyper-parameter eps"
                )
            # Sigma^-1 = L^-T L^-1; batched triangular solves are much faster on CPU than
            # torch.cholesky_inverse or torch.linalg.inv for many small matrices
            lower_inverse = torch.linalg.solve_triangular(factor, identity.expand_as(factor), upper=False)
            inverse[start:stop] = (lower_inverse.transpose(1, 2) @ lower_inverse).to(torch.float32)
        self.sums = self.outer = torch.empty(0)
        return mean.to(torch.float32), inverse


def mahalanobis_map(embeddings: torch.Tensor, mean: torch.Tensor, inverse_covariance: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of each position to its Gaussian: ``[B, d, h, w] -> [B, h, w]``.

    ``sqrt((x - mu_p)^T Sigma_p^-1 (x - mu_p))`` per position ``p``, as the official code
    (``scipy.spatial.distance.mahalanobis``) and anomalib compute it; squared values that are
    negative by rounding are clamped to 0.
    """
    batch, dim, height, width = embeddings.shape
    positions = height * width
    # contiguous: bmm on a position-strided view is far slower on CPU
    x = embeddings.reshape(batch, dim, positions).permute(2, 0, 1).to(mean.dtype).contiguous()  # [P, B, d]
    squared = torch.empty(positions, batch, dtype=mean.dtype, device=embeddings.device)
    for start in range(0, positions, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, positions)
        delta = x[start:stop] - mean[start:stop, None, :]
        squared[start:stop] = (torch.bmm(delta, inverse_covariance[start:stop]) * delta).sum(2)
    return squared.clamp_min(0).sqrt().permute(1, 0).reshape(batch, height, width)


def covariance_bytes(positions: int, dim: int) -> int:
    """Bytes of the stored float32 inverse covariances: ``4 * P * d * d``."""
    return 4 * positions * dim * dim


def left_out_distances(distances: torch.Tensor, count: int) -> torch.Tensor:
    """Mahalanobis distances of training embeddings to their Gaussian refitted without them.

    For a training point ``x`` with in-sample squared distance ``m`` (to ``mu`` and the unbiased
    ``Sigma`` of ``n`` points), leaving ``x`` out changes the mean to ``mu' = (n mu - x) / (n - 1)``
    and the covariance to ``Sigma' = (n - 1)/(n - 2) Sigma - n / ((n - 1)(n - 2)) v v^T`` with
    ``v = x - mu`` (a rank-one downdate). By Sherman-Morrison its squared distance is then

        m' = n^2 (n - 2) m / ((n - 1) ((n - 1)^2 - n m)),

    a closed form in ``m``: no refit, no matrix. The regulariser ``eps I`` is scaled with
    ``Sigma`` (``eps (n - 1)/(n - 2)`` instead of ``eps``): a deviation of order ``eps / n``.
    ``distances`` are the in-sample (not squared) distances; ``m`` stays below ``(n - 1)^2 / n``
    for a point of the sample, and is clamped there against rounding.
    """
    if count < 3:
        raise VadError(f"PaDiM's leave-one-out scores need at least 3 training images, got {count}")
    n = float(count)
    squared = distances.to(torch.float64).square().clamp(max=(n - 1) ** 2 / n * (1 - 1e-9))
    left_out = n * n * (n - 2) * squared / ((n - 1) * ((n - 1) ** 2 - n * squared))
    return left_out.sqrt().to(distances.dtype)
