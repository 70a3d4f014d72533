"""The numerical core of the variation model: per-pixel mean and standard deviation, the
tolerance image and the anomaly map, plain torch.

Images are gray values in [0, 255] (HALCON's byte images, so that ``a_abs`` is in gray levels).
"""

from __future__ import annotations

import torch

#: ITU-R BT.601 luma weights (HALCON's ``rgb1_to_gray``).
LUMA = (0.299, 0.587, 0.114)


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB to ``[B, 1, H, W]`` luma."""
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


class PixelMoments:
    """Per-pixel count, mean and sum of squared deviations over images that cover each pixel,
    merged batch by batch (Chan et al.'s pairwise update, float64): the mean and standard
    deviation of Eqs. 2.21-2.22 of Bergmann's thesis, where each pixel has its own count once
    translated images leave parts of the frame uncovered."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None  # [1, H, W]
        self.mean: torch.Tensor | None = None  # [C, H, W]
        self.m2: torch.Tensor | None = None  # [C, H, W]

    def update(self, images: torch.Tensor, valid: torch.Tensor) -> None:
        """Add ``[B, C, H, W]`` images, each where its ``[B, 1, H, W]`` mask is true."""
        values, weight = images.double(), valid.double()
        count = weight.sum(0)
        mean = (values * weight).sum(0) / count.clamp_min(1)
        m2 = ((values - mean) ** 2 * weight).sum(0)
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total.clamp_min(1)
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total.clamp_min(1)
        self.count = total

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, std, count)`` float32; the population standard deviation (divided by the
        count, Eq. 2.22); 0 where no image covers a pixel."""
        assert self.count is not None and self.mean is not None and self.m2 is not None
        std = torch.sqrt(self.m2 / self.count.clamp_min(1))
        return self.mean.float(), std.float(), self.count.float()


def left_out_moments(
    images: torch.Tensor, valid: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each training image's ``(mean, std, count)`` ``[B, C|1, H, W]`` of the model fitted
    without it, in closed form: ``c' = c - v``, ``mean' = (c mean - v x) / c'`` and
    ``c' var' = c var - v c / c' (x - mean)^2`` (removing one sample from Welford's sums); std
    0 and count 0 where no other image covers a pixel."""
    x, v = images.double(), valid.double()
    c, m, var = count.double()[None], mean.double()[None], std.double()[None] ** 2
    remaining = c - v
    safe = remaining.clamp_min(1)
    left_mean = torch.where(remaining > 0, (c * m - v * x) / safe, torch.zeros_like(x))
    left_m2 = c * var - v * c / safe * (x - m) ** 2
    left_std = torch.where(remaining > 0, torch.sqrt((left_m2 / safe).clamp_min(0)), torch.zeros_like(x))
    return left_mean.float(), left_std.float(), remaining.float()


def tolerance(std: torch.Tensor, a_abs: float, b_rel: float) -> torch.Tensor:
    """HALCON's threshold band half-width ``max(a_abs, b_rel * std)`` (``prepare_variation_model``)."""
    return torch.maximum(b_rel * std, torch.full_like(std, a_abs))


def deviation_maps(images: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, covered: torch.Tensor, reduce: str) -> torch.Tensor:
    """``|x - mean| / band`` per channel, reduced over channels by ``max`` or ``mean``
    (``[B, H, W]``); 0, the smallest possible score, where ``covered`` ``[B|1, 1, H, W]`` is false
    (no model there). A value above 1 is a pixel HALCON's ``compare_variation_model`` marks."""
    ratio = (images - mean).abs() / band
    reduced = ratio.amax(1) if reduce == "max" else ratio.mean(1)
    return torch.where(covered[:, 0], reduced, torch.zeros_like(reduced))
