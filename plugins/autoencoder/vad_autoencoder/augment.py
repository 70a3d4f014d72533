"""The thesis' augmented training set (Ch. 4): a fixed number of samples drawn from the training images.

For textures, random patches cropped evenly across the training images; for objects, the whole
image moved by a random rotation and translation, mirrored where the object allows it. A
:class:`SamplePlan` holds every sample's parameters (drawn once from a seed, a few numbers per
sample), and :func:`render` cuts or warps a batch of them from the training images when it is
needed, so 10,000 samples of 256 px images never sit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplePlan:
    """The parameters of ``count`` augmented samples.

    ``source``: the training image of each sample (``k mod N``: every image gives as many
    samples). Patches: ``top`` and ``left`` corners. Whole images: ``angle`` (degrees),
    ``shift`` ``[n, 2]`` (x, y, fractions of the side) and the mirror flags ``hflip``, ``vflip``.
    """

    source: torch.Tensor
    top: torch.Tensor | None = None
    left: torch.Tensor | None = None
    angle: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    hflip: torch.Tensor | None = None
    vflip: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.source.numel())


def draw_plan(
    count: int,
    images: int,
    side: int,
    patch: int | None,
    generator: torch.Generator,
    rotation: float = 0.0,
    translation: float = 0.0,
    horizontal_flip: bool = False,
    vertical_flip: bool = False,
) -> SamplePlan:
    """``count`` samples from ``images`` training images of ``side`` px: ``patch`` px crops at
    uniform random corners, or (``patch`` None) whole images rotated by U(-rotation, rotation)
    degrees, shifted by U(-translation, translation) of the side along each axis and flipped
    with probability 1/2 where enabled."""
    source = torch.arange(count) % images
    if patch is not None:
        corners = torch.randint(0, side - patch + 1, (2, count), generator=generator)
        return SamplePlan(source, top=corners[0], left=corners[1])

    def symmetric(size: tuple[int, ...], reach: float) -> torch.Tensor:
        return (torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * reach

    angle, shift = symmetric((count,), rotation), symmetric((count, 2), translation)
    flips = torch.rand((2, count), generator=generator) < 0.5
    return SamplePlan(source, angle=angle, shift=shift, hflip=flips[0] & horizontal_flip, vflip=flips[1] & vertical_flip)


def render(images: torch.Tensor, plan: SamplePlan, indices: torch.Tensor, patch: int | None) -> torch.Tensor:
    """The samples ``indices`` of ``plan`` cut or warped from ``images`` ``[N, C, S, S]``."""
    indices = indices.cpu()
    chosen = images[plan.source[indices].to(images.device)]
    if patch is not None:
        assert plan.top is not None and plan.left is not None
        tops, lefts = plan.top[indices].tolist(), plan.left[indices].tolist()
        return torch.stack([image[:, t : t + patch, l : l + patch] for image, t, l in zip(chosen, tops, lefts)])
    assert plan.angle is not None and plan.shift is not None and plan.hflip is not None and plan.vflip is not None
    return warp(chosen, plan.angle[indices], plan.shift[indices], plan.hflip[indices], plan.vflip[indices])


def warp(images: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor) -> torch.Tensor:
    """Square images mirrored, rotated about their centre by ``angles`` (degrees) and shifted by
    ``shifts`` (fractions of the side), bilinear, the border reflected into the uncovered corners."""
    radians = angles.double() * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    mirror_x = 1.0 - 2.0 * hflip.double()
    mirror_y = 1.0 - 2.0 * vflip.double()
    theta = torch.zeros(len(images), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * mirror_x, -sin * mirror_y
    theta[:, 1, 0], theta[:, 1, 1] = sin * mirror_x, cos * mirror_y
    theta[:, :, 2] = 2 * shifts.double()  # grid units: the side spans 2
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
