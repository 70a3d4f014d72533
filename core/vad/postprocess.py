"""From a detector's grid map to an anomaly map at each image's original resolution.

The order follows the official PatchCore code: upsample the grid map bilinearly to the
network's input size, smooth it there with a Gaussian (sigma in input pixels, default 4,
scipy's ``gaussian_filter`` with ``truncate=4`` and mirror-at-the-edge padding), then resize
bilinearly to the original image size. With a centre crop, the map covers the cropped window
of the resized image; pixels outside it get the map's minimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vad.contracts import Preprocessing


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (as scipy)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def _mirror_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices padding an axis of ``size`` by ``radius`` on both sides by mirroring with the edge
    sample repeated (scipy mode 'reflect'; tiny axes are mirrored repeatedly). A gather with
    them traces to a constant index in ONNX, so ``vad export`` reuses this blur as it is."""
    return torch.from_numpy(np.pad(np.arange(size), radius, mode="symmetric")).to(device)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps; equals ``scipy.ndimage.gaussian_filter``."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, truncate, maps.dtype).to(maps.device)
    radius = (kernel.numel() - 1) // 2
    x = maps[:, None].index_select(3, _mirror_indices(maps.shape[-1], radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _mirror_indices(maps.shape[-2], radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, h, w]`` maps to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def postprocess_maps(
    maps: torch.Tensor,
    preprocessing: Preprocessing,
    original_sizes: Sequence[tuple[int, int]],
    sigma: float = 4.0,
) -> list[np.ndarray]:
    """Grid maps ``[B, h, w]`` to float32 maps at each image's original ``(H, W)``."""
    maps = gaussian_blur(upsample(maps.float(), preprocessing.size), sigma)
    if preprocessing.crop:
        full = preprocessing.resize or preprocessing.size
        canvas = maps.amin(dim=(1, 2), keepdim=True).expand(-1, *full).clone()
        top, left = (full[0] - preprocessing.size[0]) // 2, (full[1] - preprocessing.size[1]) // 2
        canvas[:, top : top + preprocessing.size[0], left : left + preprocessing.size[1]] = maps
        maps = canvas
    return [
        upsample(single[None], tuple(size))[0].cpu().numpy().astype(np.float32, copy=False)
        for single, size in zip(maps, original_sizes)
    ]
