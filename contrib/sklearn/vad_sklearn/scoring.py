"""Anomaly scores of fitted classical detectors, computed with torch from saved parameters.

Each function reproduces ``-estimator.score_samples(X)`` of the scikit-learn estimator it is
named after (the tests check equality), so that a fitted detector is a handful of tensors that
load without pickle and score on any device. Inputs are float64 ``[M, D]``; outputs ``[M]``,
higher = more anomalous.
"""

from __future__ import annotations

import torch

#: Test vectors scored at once (bounds the ``[chunk, N]`` distance block).
QUERY_CHUNK = 4096


def _nearest(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances ``[M, k]`` (ascending) and indices of the ``k`` nearest training rows."""
    distances, indices = [], []
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        block = torch.cdist(queries[start : start + QUERY_CHUNK], train, compute_mode="donot_use_mm_for_euclid_dist")
        values, index = block.topk(k, dim=1, largest=False)
        distances.append(values)
        indices.append(index)
    return torch.cat(distances), torch.cat(indices)


def knn_scores(queries: torch.Tensor, train: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance to the ``k`` nearest training vectors (seed 003's kNN score)."""
    distances, _ = _nearest(queries, train, k)
    return distances.mean(1)


def lof_training_statistics(train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k_distance [N], lrd [N])`` of the training vectors, each without itself as a neighbour.

    ``k_distance`` is the distance to the k-th nearest other training vector; ``lrd`` the local
    reachability density ``1 / (mean reach-dist + 1e-10)`` (scikit-learn's formula).
    """
    distances = torch.cdist(train, train, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    nearest, index = distances.topk(k, dim=1, largest=False)
    k_distance = nearest[:, -1]
    lrd = 1.0 / (torch.maximum(nearest, k_distance[index]).mean(1) + 1e-10)
    return k_distance, lrd


def lof_scores(queries: torch.Tensor, train: torch.Tensor, k_distance: torch.Tensor, lrd: torch.Tensor, k: int) -> torch.Tensor:
    """Local Outlier Factor of new vectors (``LocalOutlierFactor(novelty=True)``, negated score_samples)."""
    distances, index = _nearest(queries, train, k)
    query_lrd = 1.0 / (torch.maximum(distances, k_distance[index]).mean(1) + 1e-10)
    return (lrd[index] / query_lrd[:, None]).mean(1)


def squared_mahalanobis(queries: torch.Tensor, location: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(x - location)^T precision (x - location)`` (``EllipticEnvelope``'s negated score_samples)."""
    delta = queries - location
    return ((delta @ precision) * delta).sum(1)


def kernel(queries: torch.Tensor, support: torch.Tensor, name: str, gamma: float, degree: int, coef0: float) -> torch.Tensor:
    """libsvm's kernels ``K(x, sv)`` ``[M, S]``: rbf, linear, poly, sigmoid."""
    if name == "rbf":
        return torch.exp(-gamma * torch.cdist(queries, support, compute_mode="donot_use_mm_for_euclid_dist") ** 2)
    dot = queries @ support.T
    if name == "linear":
        return dot
    if name == "poly":
        return (gamma * dot + coef0) ** degree
    if name == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    raise ValueError(f"unknown kernel {name!r}")


def ocsvm_scores(
    queries: torch.Tensor, support: torch.Tensor, dual_coef: torch.Tensor, name: str, gamma: float, degree: int, coef0: float
) -> torch.Tensor:
    """``-sum_i alpha_i K(sv_i, x)``: ``OneClassSVM``'s negated (unshifted) score_samples."""
    return -(kernel(queries, support, name, gamma, degree, coef0) @ dual_coef)
