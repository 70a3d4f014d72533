"""The numerical core of the CNN feature dictionary, in plain torch (no I/O, no vad objects).

* :func:`fit_pca`: principal axes keeping a share of the variance (scikit-learn's rule for a
  fractional ``n_components``: the fewest axes whose cumulative explained-variance ratio
  exceeds it);
* :func:`kmeans`: Lloyd's k-means with k-means++ seeding, restarts, the lowest inertia kept;
  random draws from a CPU generator only, so a seed gives the same dictionary on every device;
* :func:`nearest_rows`: the training descriptor nearest to each cluster centre (the dictionary
  words of the MVTec AD paper's implementation);
* :func:`word_score`: a descriptor's mean Euclidean distance to its ``m`` nearest words;
* :func:`patch_starts`, :func:`coverage`, :func:`coverage_average`: the sliding-window grid and
  the anomaly map in which each pixel is the mean score of the patches covering it.
"""

from __future__ import annotations

import torch

#: Lloyd iterations stop once the centres move less than this share of the data's mean
#: per-dimension variance (summed squared shift), scikit-learn's default ``tol``.
KMEANS_TOLERANCE = 1e-4


def squared_distances(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` squared Euclidean distances, never negative."""
    products = rows @ centres.T
    return ((rows * rows).sum(1, keepdim=True) - 2 * products + (centres * centres).sum(1)[None, :]).clamp_min(0)


def fit_pca(rows: torch.Tensor, variance: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mean [C], components [C, d], kept ratio)``: the principal axes of ``rows`` ``[N, C]``
    (float64 covariance) whose cumulative explained-variance ratio first exceeds ``variance``
    (all of them at ``variance = 1``), largest first; project with ``(x - mean) @ components``.
    The rows must vary (a positive total variance)."""
    data = rows.double()
    mean = data.mean(0)
    centred = data - mean
    covariance = centred.T @ centred / max(1, data.shape[0] - 1)
    values, vectors = torch.linalg.eigh(covariance)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    ratios = torch.cumsum(values / values.sum(), 0)
    kept = min(int(torch.searchsorted(ratios, torch.tensor([variance], dtype=ratios.dtype, device=ratios.device), right=True)) + 1, len(values))
    return mean.float(), vectors[:, :kept].float().contiguous(), float(ratios[kept - 1])


def kmeans_plus_plus(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` initial centres by k-means++: the first uniformly, each next with probability
    proportional to its squared distance to the nearest centre chosen (uniform once all are 0)."""
    first = int(torch.randint(len(rows), (1,), generator=generator))
    chosen = [first]
    nearest = squared_distances(rows, rows[first : first + 1])[:, 0]
    for _ in range(1, count):
        weights = nearest.double().cpu()
        index = int(torch.multinomial(weights if float(weights.sum()) > 0 else torch.ones_like(weights), 1, generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, squared_distances(rows, rows[index : index + 1])[:, 0])
    return rows[chosen].clone()


def _cluster_means(rows: torch.Tensor, labels: torch.Tensor, distances: torch.Tensor, count: int) -> torch.Tensor:
    """The mean of each cluster; an empty cluster takes the point farthest from its own centre
    (as scikit-learn relocates empty clusters), each such point used once."""
    sums = torch.zeros(count, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, labels, rows)
    sizes = torch.bincount(labels, minlength=count)
    centres = sums / sizes.clamp_min(1)[:, None].to(rows.dtype)
    empty = (sizes == 0).nonzero().flatten().tolist()
    if empty:
        own = distances.gather(1, labels[:, None])[:, 0]
        farthest = torch.argsort(own, descending=True)[: len(empty)]
        centres[empty] = rows[farthest]
    return centres


def kmeans(rows: torch.Tensor, count: int, generator: torch.Generator, restarts: int = 10, iterations: int = 300) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(centres [K, D], labels [N], inertia)`` of the best of ``restarts`` Lloyd runs (lowest
    sum of squared distances), each seeded by k-means++ and run until the labels stop changing,
    the centres move less than :data:`KMEANS_TOLERANCE`, or ``iterations`` updates."""
    tolerance = KMEANS_TOLERANCE * float(rows.var(0, unbiased=False).mean()) if len(rows) > 1 else 0.0
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(restarts):
        centres = kmeans_plus_plus(rows, count, generator)
        labels = None
        for _ in range(iterations):
            distances = squared_distances(rows, centres)
            new_labels = distances.argmin(1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            updated = _cluster_means(rows, labels, distances, count)
            shift = float(((updated - centres) ** 2).sum())
            centres = updated
            if shift <= tolerance:
                break
        distances = squared_distances(rows, centres)
        labels = distances.argmin(1)
        inertia = float(distances.gather(1, labels[:, None]).sum())
        if best is None or inertia < best[2]:
            best = (centres, labels, inertia)
    assert best is not None, "restarts >= 1"
    return best


def nearest_rows(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """For each centre, the index of the row nearest to it ``[K]``."""
    return squared_distances(centres, rows).argmin(1)


def word_score(descriptors: torch.Tensor, words: torch.Tensor, neighbors: int) -> torch.Tensor:
    """The mean Euclidean distance of each descriptor ``[..., D]`` to its ``neighbors`` nearest
    words ``[K, D]``: ``[...]``."""
    flat = descriptors.reshape(-1, descriptors.shape[-1])
    distances = squared_distances(flat, words).sqrt()
    nearest = distances.topk(neighbors, dim=1, largest=False).values
    return nearest.mean(1).reshape(descriptors.shape[:-1])


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Window starts along an axis: every ``stride`` pixels, plus one window ending at the
    border when the stride does not reach it, so every pixel is covered."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def coverage(length: int, starts: list[int], patch: int, device: torch.device | None = None) -> torch.Tensor:
    """``[length, n]`` float32: 1 where pixel ``y`` lies in window ``i``."""
    pixels = torch.arange(length, device=device)[:, None]
    begin = torch.tensor(starts, device=device)[None, :]
    return ((pixels >= begin) & (pixels < begin + patch)).float()


def coverage_average(scores: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Patch scores ``[B, n_h, n_w]`` to pixel maps ``[B, H, W]``: each pixel the mean score of
    the windows covering it (``rows`` ``[H, n_h]`` and ``columns`` ``[W, n_w]`` from
    :func:`coverage`; coverage is separable, so sums and counts are two matrix products)."""
    sums = torch.einsum("hi,bij,wj->bhw", rows, scores, columns)
    counts = rows.sum(1)[:, None] * columns.sum(1)[None, :]
    return sums / counts


__all__ = [
    "KMEANS_TOLERANCE",
    "coverage",
    "coverage_average",
    "fit_pca",
    "kmeans",
    "kmeans_plus_plus",
    "nearest_rows",
    "patch_starts",
    "squared_distances",
    "word_score",
]
