"""Perlin noise and the random draws every generator shares; plain torch functions, no I/O.

All randomness comes from an explicit :class:`torch.Generator`. Random numbers are drawn on the
generator's device (a CPU generator can drive GPU images) and moved to where they are used, so a
seed gives the same augmentations on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def uniform(generator: torch.Generator, size: int | Sequence[int], low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``size`` draws from U[low, high) as a float64 CPU tensor."""
    size = (size,) if isinstance(size, int) else tuple(size)
    draws = torch.rand(size, generator=generator, device=generator.device, dtype=torch.float64).cpu()
    return low + (high - low) * draws


def integers(generator: torch.Generator, size: int | Sequence[int], low: int, high: int) -> torch.Tensor:
    """``size`` integers in ``[low, high)`` (like ``torch.randint``) as an int64 CPU tensor."""
    size = (size,) if isinstance(size, int) else tuple(size)
    return torch.randint(low, high, size, generator=generator, device=generator.device).cpu()


def _fade(t: torch.Tensor) -> torch.Tensor:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0, 1)."""
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise_2d(
    shape: tuple[int, int],
    res: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gradient (Perlin) noise ``[H, W]`` with ``res`` lattice periods along (rows, columns).

    Same construction as DRAEM's ``rand_perlin_2d_np``: unit gradients with uniform random angles
    on a ``(res[0] + 1) x (res[1] + 1)`` lattice, dot products with the offsets to the four
    corners, quintic fade, scaled by sqrt(2) so values lie in about [-1, 1]. Where DRAEM needs
    ``shape`` divisible by ``res``, pixel ``i`` here sits at lattice coordinate ``i * res / shape``
    for any shape (identical values when it divides).
    """
    height, width = int(shape[0]), int(shape[1])
    res_y, res_x = int(res[0]), int(res[1])
    if height < 1 or width < 1 or res_y < 1 or res_x < 1:
        raise ValueError(f"perlin_noise_2d needs a positive shape and res, got shape={shape}, res={res}")
    angles = 2 * math.pi * uniform(generator, (res_y + 1, res_x + 1))
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).to(device=device, dtype=dtype)
    # Exact integer arithmetic for the lattice cell and the offset inside it.
    rows = torch.arange(height, device=device) * res_y
    cols = torch.arange(width, device=device) * res_x
    cell_y, cell_x = rows // height, cols // width
    fy = ((rows % height).to(dtype) / height)[:, None]
    fx = ((cols % width).to(dtype) / width)[None, :]

    grad_y, grad_x = gradients[..., 0], gradients[..., 1]

    def corner(dy: int, dx: int) -> torch.Tensor:
        # Two index_selects per component: much faster than advanced indexing with a [H, W] index.
        rows_at, cols_at = cell_y + dy, cell_x + dx
        along_y = grad_y.index_select(0, rows_at).index_select(1, cols_at)
        along_x = grad_x.index_select(0, rows_at).index_select(1, cols_at)
        return (fy - dy) * along_y + (fx - dx) * along_x

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)  # rows interpolate first, as in DRAEM
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2) * torch.lerp(top, bottom, tx)


def fractal_noise_2d(
    shape: tuple[int, int],
    res: tuple[int, int],
    generator: torch.Generator,
    octaves: int = 4,
    persistence: float = 0.5,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sum of ``octaves`` Perlin layers, each twice the frequency and ``persistence`` times the
    amplitude of the previous one (DRAEM's ``rand_perlin_2d_octaves``); frequencies are capped
    at one period per two pixels."""
    noise = torch.zeros(shape, device=device)
    amplitude = 1.0
    for octave in range(octaves):
        factor = 2**octave
        octave_res = (min(res[0] * factor, max(1, shape[0] // 2)), min(res[1] * factor, max(1, shape[1] // 2)))
        noise += amplitude * perlin_noise_2d(shape, octave_res, generator, device=device)
        amplitude *= persistence
    return noise
