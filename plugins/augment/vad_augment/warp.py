"""Geometric warps of image batches: rotation and the local swirl; plain torch functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate_images(images: torch.Tensor, angles_degrees: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Rotate each image of ``[B, C, H, W]`` about its centre by its angle (counter-clockwise,
    degrees); pixels coming from outside the image are 0, as imgaug's ``Affine(rotate=...)``
    (constant fill 0) used by DRAEM. Non-square images rotate without distortion."""
    batch, _, height, width = images.shape
    radians = angles_degrees.to(device=images.device, dtype=images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # affine_grid works in [-1, 1] coordinates; rescale so the rotation happens in pixel units.
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * height / width
    theta[:, 1, 0] = sin * width / height
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def swirl_images(
    images: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, strengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swirl a disc of each image; returns ``(swirled [B, C, H, W], mask [B, 1, H, W])``.

    The warp is scikit-image's ``transform.swirl``: the output pixel at distance ``rho`` from the
    centre samples the input at the same distance, turned by ``strength * exp(-rho / r)`` radians
    with ``r = ln(2) * radius / 5``. scikit-image warps the whole image with this decaying angle;
    here the warp stops at ``rho = radius`` (where the angle has decayed to
    ``strength * 7e-4`` rad, a sub-pixel shift), so pixels outside the disc stay bit-identical
    and the disc is the anomaly mask. ``centers`` is ``[B, 2]`` (row, column) in pixels,
    ``radii`` and ``strengths`` are ``[B]``.
    """
    batch, _, height, width = images.shape
    device, dtype = images.device, images.dtype
    centers = centers.to(device=device, dtype=dtype)
    radii = radii.to(device=device, dtype=dtype).view(batch, 1, 1)
    strengths = strengths.to(device=device, dtype=dtype).view(batch, 1, 1)
    rows = torch.arange(height, device=device, dtype=dtype).view(1, height, 1)
    cols = torch.arange(width, device=device, dtype=dtype).view(1, 1, width)
    dy = rows - centers[:, 0].view(batch, 1, 1)
    dx = cols - centers[:, 1].view(batch, 1, 1)
    rho = torch.sqrt(dx * dx + dy * dy)
    decay = math.log(2) * radii / 5
    angle = torch.atan2(dy, dx) + strengths * torch.exp(-rho / decay)
    source_y = centers[:, 0].view(batch, 1, 1) + rho * torch.sin(angle)
    source_x = centers[:, 1].view(batch, 1, 1) + rho * torch.cos(angle)
    # Pixel centres to grid_sample's [-1, 1] coordinates (align_corners=False).
    grid = torch.stack(((2 * source_x + 1) / width - 1, (2 * source_y + 1) / height - 1), dim=-1)
    swirled = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = (rho < radii).unsqueeze(1)
    return torch.where(mask, swirled, images), mask.to(dtype)
