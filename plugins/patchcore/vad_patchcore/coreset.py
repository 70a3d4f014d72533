"""Approximate greedy coreset (k-center) selection, as in the official PatchCore sampler.

The official ``ApproximateGreedyCoresetSampler`` (amazon-science/patchcore-inspection,
``sampler.py``) does, on the ``[N, D]`` patch features:

1. project them with a random ``Linear(D, 128, bias=False)`` (default PyTorch init, i.e.
   ``U(-1/sqrt(D), 1/sqrt(D))``), skipped when ``D == 128``;
2. draw ``number_of_starting_points=10`` distinct random points and initialise every point's
   "distance to the coreset" with its *mean* Euclidean distance to them (the starting points
   themselves are not added to the coreset);
3. repeat ``int(N * percentage)`` times: select the point with the largest distance, then lower
   every point's distance to ``min(distance, ||x - selected||)``.

:func:`approximate_greedy_coreset` returns exactly that selection (same indices for the same
projection matrix and starting points). Its cost is ``count`` passes over ``[N, 128]``; the
detector keeps ``N`` small (and the pass in the CPU cache) by selecting per chunk of patches,
see :class:`vad_patchcore.detector.PatchCore`.

Deviation from the official code, documented: when ``D <= projection_dim`` no projection is
done (the official code projects *up* to 128 dims when ``D < 128``, which only adds noise).
"""

from __future__ import annotations

import math

import torch

def random_projection(dim_in: int, dim_out: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[dim_in, dim_out]`` matrix drawn like ``torch.nn.Linear(dim_in, dim_out).weight.T``.

    ``nn.Linear``'s default init is Kaiming-uniform with ``a = sqrt(5)``, i.e. uniform on
    ``[-1/sqrt(dim_in), 1/sqrt(dim_in)]``; drawn here from ``generator`` (on the CPU, so the
    same seed gives the same matrix on every device).
    """
    bound = 1.0 / math.sqrt(dim_in)
    weight = torch.rand(dim_in, dim_out, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    return weight.to(dtype)


def project(features: torch.Tensor, projection_dim: int | None, generator: torch.Generator) -> torch.Tensor:
    """Features in the space the selection runs in (random projection, or the features as they are)."""
    if not projection_dim or features.shape[1] <= projection_dim:
        return features
    weight = random_projection(features.shape[1], projection_dim, generator, features.dtype).to(features.device)
    return features @ weight


def _squared_distances(points: torch.Tensor, squared_norms: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``||x - c||^2`` for every row x of ``points`` (clamped at 0 against cancellation)."""
    return (squared_norms - 2.0 * (points @ centre) + centre.dot(centre)).clamp_min_(0.0)


def approximate_greedy_coreset(
    features: torch.Tensor,
    count: int,
    projection_dim: int | None = 128,
    starting_points: int = 10,
    generator: torch.Generator | None = None,
    start_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (int64, selection order) of ``count`` rows chosen by approximate greedy k-center.

    ``features`` is ``[N, D]`` on any device. ``projection_dim`` None or 0 disables the random
    projection. ``start_indices`` overrides the random starting points (tests); otherwise
    ``starting_points`` distinct rows are drawn from ``generator``.
    """
    n = features.shape[0]
    count = max(0, min(int(count), n))
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        points = project(features, projection_dim, generator)
        if start_indices is None:
            starts = torch.randperm(n, generator=generator)[: max(1, min(starting_points, n))]
        else:
            starts = torch.as_tensor(start_indices, dtype=torch.long)
        starts = starts.to(points.device)
        squared_norms = (points * points).sum(1)
        # official: mean of plain Euclidean distances to the starting points. Distances are kept
        # squared below; squaring is monotone, so min / argmax (the selection) are unchanged.
        start_distances = torch.addmm(squared_norms[starts][None], points, points[starts].T, alpha=-2.0)
        start_distances = (start_distances + squared_norms[:, None]).clamp_min_(0.0).sqrt_()
        min_distances = start_distances.mean(1).square_()
        del start_distances
        return _greedy_loop(points, squared_norms, min_distances, count)


def _greedy_loop(points: torch.Tensor, squared_norms: torch.Tensor, min_distances: torch.Tensor, count: int) -> torch.Tensor:
    """The official loop: one distance pass over every point per selected centre."""
    selected = torch.empty(count, dtype=torch.long, device=points.device)
    for step in range(count):
        index = torch.argmax(min_distances)
        selected[step] = index
        torch.minimum(min_distances, _squared_distances(points, squared_norms, points[index]), out=min_distances)
    return selected.cpu()
