"""Images (RGB uint8 at original resolution) to a normalised float batch, as a Preprocessing says."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vad.contracts import Preprocessing

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "area": "area"}


def interpolate_mode(interpolation: str) -> str:
    """The ``F.interpolate`` mode used for a backbone's ``interpolation`` (unknown: bilinear)."""
    return _MODES.get(interpolation, "bilinear")


def resize_batch(batch: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``[B, C, H, W]`` like PIL does (anti-aliased when shrinking)."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    mode = interpolate_mode(interpolation)
    if mode in ("nearest", "area"):
        return F.interpolate(batch, size=size, mode=mode)
    return F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=True)


def center_crop(batch: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Central ``size`` window of ``[B, C, H, W]``."""
    height, width = batch.shape[-2:]
    top, left = (height - size[0]) // 2, (width - size[1]) // 2
    return batch[..., top : top + size[0], left : left + size[1]]


def to_batch(
    images: Sequence[np.ndarray], preprocessing: Preprocessing, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Stack RGB uint8 images ``[H, W, 3]`` (any sizes) into a normalised ``[B, 3, h, w]`` batch.

    Resizing runs on ``device`` so a GPU does that work too.
    """
    resized_size = preprocessing.resize or preprocessing.size
    out = []
    for image in images:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
        tensor = resize_batch(tensor, tuple(resized_size), preprocessing.interpolation)
        if preprocessing.crop:
            tensor = center_crop(tensor, tuple(preprocessing.size))
        out.append(tensor)
    batch = torch.cat(out).clamp_(0.0, 1.0)
    mean = torch.tensor(preprocessing.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std
