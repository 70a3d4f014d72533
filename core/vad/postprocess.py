"""From a detector's grid map to an anomaly map at each image's original resolution.

The order follows the official PatchCore code: upsample the grid map bilinearly to the
network's input size, smooth it there with a Gaussian (sigma in input pixels, default 4,
scipy's ``gaussian_filter`` with ``truncate=4`` and mirror-at-the-edge padding), then resize
bilinearly to the original image size. With a centre crop, the map covers the cropped window
of the resized image; pixels outside it get the map's minimum.
"""

from __future__ import annotations

import functools
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


def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """``[size, size]`` float64 matrix of the 1-D Gaussian blur along an axis of ``size`` samples,
    with scipy's mode 'reflect' at the edges (mirrored with the edge sample repeated; tiny axes
    are mirrored repeatedly). ``sigma <= 0``: the identity."""
    if sigma <= 0:
        return np.eye(size)
    kernel = gaussian_kernel1d(sigma, truncate, torch.float64).numpy()
    radius = (kernel.size - 1) // 2
    source = np.pad(np.arange(size), radius, mode="symmetric")  # input sample behind each padded one
    matrix = np.zeros((size, size))
    for tap, weight in enumerate(kernel):  # output i reads padded sample i + tap
        np.add.at(matrix, (np.arange(size), source[tap : tap + size]), weight)
    return matrix


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` float64 matrix of :func:`upsample` along one axis: torch's linear
    interpolation with ``align_corners=False`` (source position ``(i + 0.5) * in / out - 0.5``,
    clamped at 0; the last sample repeats past the end)."""
    position = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lower = position.astype(np.int64)
    upper = np.minimum(lower + 1, size_in - 1)
    weight = position - lower
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), lower), 1.0 - weight)
    np.add.at(matrix, (np.arange(size_out), upper), weight)
    return matrix


@functools.lru_cache(maxsize=64)
def map_operator(size_in: int, size_out: int, sigma: float) -> np.ndarray:
    """``[size_out, size_in]`` float64: bilinear upsampling to ``size_out``, then the Gaussian
    blur, along one axis (see :func:`upsample_and_blur`). Cached: a handful of sizes per run.
    Built in numpy, so that an ONNX trace sees a constant, not the ops that made it."""
    operator = blur_matrix(size_out, sigma) @ bilinear_matrix(size_in, size_out)
    operator.flags.writeable = False  # shared by every caller through the cache
    return operator


def upsample_and_blur(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """``[B, h, w]`` maps upsampled bilinearly to ``size`` and smoothed there by a Gaussian of
    ``sigma`` pixels: equal to scipy's ``gaussian_filter`` (truncate 4, mode 'reflect') of
    :func:`upsample`'s output.

    Both steps are linear and separable, so they compose into one ``[H, h]`` and one ``[W, w]``
    matrix: two small matrix products per map, tens of times cheaper than convolving the
    upsampled map, and two MatMuls with constant operands in an ONNX graph.
    """
    rows, cols = (
        torch.tensor(map_operator(int(n), int(m), float(sigma)), dtype=maps.dtype, device=maps.device)
        for n, m in zip(maps.shape[-2:], size)
    )
    return torch.matmul(torch.matmul(rows, maps), cols.T)


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
    return working_to_original(upsample_and_blur(maps.float(), preprocessing.size, sigma), preprocessing, original_sizes)


def working_to_original(maps: torch.Tensor, preprocessing: Preprocessing, original_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Maps at the working size (upsampled and blurred, as an exported graph gives them) to
    float32 maps at each image's original ``(H, W)``; with a centre crop, the rest of the resized
    image holds each map's minimum."""
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
