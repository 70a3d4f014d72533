"""Patchwise reconstruction: the thesis' AE and f-AnoGAN see fixed-size patches of larger images.

Patches are cut at a stride, each is reconstructed on its own, and every output pixel is the mean
of the patches that cover it (Bergmann's thesis, Ch. 3 and 4). The last row and column of patches
are shifted to end at the border, so every pixel is covered even when the stride does not divide.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vad.errors import VadError


def patch_starts(length: int, patch_size: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` pixels, plus one patch flush with the end."""
    if patch_size > length:
        raise VadError(f"patches of {patch_size} px do not fit an image side of {length} px; use a larger image or a smaller patch")
    if stride < 1:
        raise VadError(f"the patch stride must be at least 1, got {stride}")
    starts = list(range(0, length - patch_size + 1, stride))
    if starts[-1] != length - patch_size:
        starts.append(length - patch_size)
    return starts


def reconstruct_by_patches(
    images: torch.Tensor,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    patch_size: int,
    stride: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Reconstruct ``[B, C, H, W]`` images patch by patch and average overlapping outputs.

    ``reconstruct`` maps ``[N, C, p, p]`` patches to outputs ``[N, C', p, p]`` (``C'`` may differ:
    e.g. one-channel anomaly maps); it gets the patches position by position, each position's
    patches of the whole batch together, at most ``batch_size`` patches a call. Returns
    ``[B, C', H, W]``. Each output is placed by zero padding and summed, and the sum divided by
    the coverage count, a constant: an ONNX trace stays small.
    """
    import numpy as np
    import torch.nn.functional as F

    height, width = images.shape[-2:]
    corners = [(top, left) for top in patch_starts(height, patch_size, stride) for left in patch_starts(width, patch_size, stride)]
    coverage = np.zeros((height, width), np.float32)
    for top, left in corners:
        coverage[top : top + patch_size, left : left + patch_size] += 1
    total = None
    corners_per_call = max(1, batch_size // len(images))
    for first in range(0, len(corners), corners_per_call):
        chunk = corners[first : first + corners_per_call]
        patches = torch.cat([images[..., top : top + patch_size, left : left + patch_size] for top, left in chunk])
        outputs = reconstruct(patches)
        outputs = outputs.reshape(len(chunk), -1, *outputs.shape[1:])  # -1: the batch stays dynamic in a trace
        for (top, left), output in zip(chunk, outputs):
            placed = F.pad(output, (left, width - left - patch_size, top, height - top - patch_size))
            total = placed if total is None else total + placed
    return total / torch.from_numpy(coverage).to(total)
