"""DSR's synthetic anomalies (official ``train_dsr.py`` and ``data_loader.py``); plain functions.

* Main training: anomalies in the quantized feature space. A Perlin mask (DRAEM's, from
  :mod:`vad_augment`) is max-pooled to a code grid; inside it each code is replaced by a code of
  the codebook drawn uniformly among the ``strength`` share nearest to the position's
  pre-quantization feature, leaving out the 5 % nearest (:func:`code_anomalies`). The strength
  is drawn per image and level from U[anomaly_strength, 1] (official 0.2).
* Up-sampling module training: image-space anomalies, a Perlin region filled with one random
  colour blended over the image (:func:`color_anomalies`).

Every random draw comes from an explicit :class:`torch.Generator` (CPU draws moved to the data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vad_augment.noise import integers, uniform

#: The share of a codebook nearest to a feature that replacements leave out (official 0.05).
NEAR_FRACTION = 0.05


def downsample_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ``[B, 1, H, W]`` 0/1 mask max-pooled to ``grid`` (official: ``max_pool2d`` by the size ratio):
    a code is anomalous when any of its pixels is."""
    ratio = (mask.shape[2] // grid[0], mask.shape[3] // grid[1])
    return F.max_pool2d(mask, ratio)


def code_anomalies(
    features: torch.Tensor,
    quantized: torch.Tensor,
    codebook: torch.Tensor,
    mask: torch.Tensor,
    strength: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The official ``generate_fake_anomalies_joined``: ``quantized`` ``[B, D, h, w]`` with its
    codes inside ``mask`` (``[B, 1, H, W]``, pooled to ``h x w``) replaced.

    For image ``k`` every position takes the ``top = max(1, min(int(strength[k] K) + 1, K - 1))``
    codes nearest to its pre-quantization ``features`` and draws one uniformly among ranks
    ``int(0.05 K) .. top - 1`` (low strength: near codes, plausible appearance; high strength:
    far ones). Where ``top`` would leave no rank (strengths below the official range) the farthest
    of the ``top`` remains.
    """
    batch, dim, height, width = quantized.shape
    count = codebook.shape[0]
    grid_mask = downsample_mask(mask, (height, width)).flatten(1).bool()
    flat = features.permute(0, 2, 3, 1).reshape(batch, height * width, dim)
    out = quantized.permute(0, 2, 3, 1).reshape(batch, height * width, dim).clone()
    squared_codes = codebook.pow(2).sum(1)
    for k in range(batch):
        # Only the positions inside the mask: the official code draws a code for every position
        # and keeps those, which gives the same distribution at several times the cost.
        where = grid_mask[k].nonzero().squeeze(1)
        if where.numel() == 0:
            continue
        points = flat[k, where]
        distances = points.pow(2).sum(1, keepdim=True) + squared_codes - 2 * points @ codebook.t()
        top = max(1, min(int(float(strength[k]) * count) + 1, count - 1))
        nearest = torch.topk(distances, top, dim=1, largest=False).indices
        window = nearest[:, min(int(count * NEAR_FRACTION), top - 1) :]
        ranks = integers(generator, where.numel(), 0, window.shape[1]).to(window.device)
        out[k, where] = codebook[window.gather(1, ranks[:, None]).squeeze(1)]
    return out.view(batch, height, width, dim).permute(0, 3, 1, 2)


def segmentation_target(mask: torch.Tensor, grid_hi: tuple[int, int], grid_lo: tuple[int, int], use_both: torch.Tensor, use_lo: torch.Tensor) -> torch.Tensor:
    """The detection module's ground truth: the mask pooled to the grid of the level that got
    anomalies and enlarged back (nearest), the coarse Q_lo grid when both levels did (official)."""
    size = mask.shape[2:]
    hi = F.interpolate(downsample_mask(mask, grid_hi), size=size, mode="nearest")
    lo = F.interpolate(downsample_mask(mask, grid_lo), size=size, mode="nearest")
    return lo * use_both + (lo * use_lo + hi * (1 - use_lo)) * (1 - use_both)


def color_anomalies(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, max_opacity: float = 0.8) -> torch.Tensor:
    """The up-sampling stage's anomalies (official ``MVTecImageAnomTrainDataset``): where
    ``masks`` (``[B, 1, H, W]``, 0/1) is 1 the image becomes ``(1 - beta) c + beta x`` with one
    uniform random colour ``c`` per image and ``beta`` uniform in [0, ``max_opacity``); elsewhere
    it stays as it is."""
    count = images.shape[0]
    colors = uniform(generator, (count, 3)).to(images).view(count, 3, 1, 1)
    beta = uniform(generator, count, 0.0, max_opacity).to(images).view(count, 1, 1, 1)
    return torch.where(masks.bool(), (1 - beta) * colors + beta * images, images)
