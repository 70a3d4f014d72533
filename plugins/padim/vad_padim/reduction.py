"""Channel reduction before PaDiM's Gaussians: a random channel subset (paper) or PCA.

The paper (Defard et al., ICPR-W 2021, Sec. III-B, Table I) keeps a random subset of the
concatenated channels (100 of 448 for ResNet18, 550 of 1792 for Wide-ResNet50-2) and finds it
as good as PCA at a fraction of the cost; the official code draws it once with
``random.sample(range(t_d), d)`` under seed 1024. Here the subset comes from a seeded torch
generator, so it is reproducible from the detector's ``seed`` and saved with the model.

PCA is the alternative the paper compares against: one projection for every position, fitted
on all training patches (streamed: float64 channel sums and a ``C x C`` scatter matrix).
"""

from __future__ import annotations

import torch

from vad.errors import VadError


def random_channel_subset(channels: int, dim: int, seed: int) -> torch.Tensor:
    """``dim`` distinct channel indices out of ``channels`` (sorted, int64), drawn with ``seed``."""
    if not 1 <= dim <= channels:
        raise VadError(f"cannot keep {dim} of {channels} channels: choose dim between 1 and {channels}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(channels, generator=generator)[:dim].sort().values


class ChannelScatter:
    """Streaming mean and scatter of the channel vectors of every patch (for PCA)."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.sums = torch.zeros(channels, dtype=torch.float64, device=device)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add the patches of a grid ``[B, C, h, w]``."""
        rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).to(self.sums.device, torch.float64)
        self.sums += rows.sum(0)
        self.outer += rows.T @ rows
        self.count += rows.shape[0]

    def principal_components(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(center [C], projection [C, dim])`` float32: the top-``dim`` principal axes."""
        channels = self.sums.shape[0]
        if not 1 <= dim <= channels:
            raise VadError(f"cannot keep {dim} principal components of {channels} channels: choose dim between 1 and {channels}")
        if self.count < 2:
            raise VadError("PCA needs at least two training patches; add normal training images")
        center = self.sums / self.count
        covariance = (self.outer - self.count * torch.outer(center, center)) / (self.count - 1)
        _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        projection = vectors[:, -dim:].flip(1)
        return center.to(torch.float32), projection.to(torch.float32).contiguous()
