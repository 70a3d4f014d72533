"""Image scores from patch scores: the maximum, or the paper's re-weighted maximum (Eq. 7).

PatchCore (Roth et al., CVPR 2022), Eq. 6-7: with ``m_test*`` the test patch with the largest
nearest-neighbour distance ``s* = ||m_test* - m*||`` to its nearest bank item ``m*``, and
``N_b(m*)`` the ``b`` nearest bank items of ``m*``,

    s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*

so a patch whose nearest bank item lies in a dense region of the bank (many close
alternatives) is down-weighted less than one matched to an isolated item.

Who does what: the paper defines Eq. 7 with ``b = 9``; the official code does **not** apply it
(image score = max patch score); anomalib applies it (``num_neighbors=9``, on by default),
with ``N_b(m*)`` found by a k-NN query of ``m*`` in the bank, so it includes ``m*`` itself at
distance 0, and computes ``1 - softmax(distances)[0]``. We follow the paper's formula literally
(the numerator uses ``m*``), which equals anomalib's whenever ``m*`` is its own first
neighbour, i.e. always unless the bank holds duplicates. The weight uses plain Euclidean
distances (the paper's norms) even when patch scores are squared distances.
"""

from __future__ import annotations

import torch


def max_scores(patch_scores: torch.Tensor) -> torch.Tensor:
    """Image score = the largest patch score, ``[B, P] -> [B]`` (official code, paper Eq. 6)."""
    return patch_scores.amax(1)


def reweighted_scores(
    patch_scores: torch.Tensor,
    nearest: torch.Tensor,
    embeddings: torch.Tensor,
    bank: torch.Tensor,
    neighbour_indices: torch.Tensor,
) -> torch.Tensor:
    """Paper Eq. 7 for each image.

    ``patch_scores`` ``[B, P]``; ``nearest`` ``[B, P]`` the bank index of each patch's nearest
    item; ``embeddings`` ``[B, P, D]`` the test patches; ``bank`` ``[M, D]``;
    ``neighbour_indices`` ``[B, b]`` the bank indices of ``N_b(m*)`` for each image's ``m*``
    (see :func:`most_anomalous`).
    """
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    star = patch_scores.argmax(1)
    s_star = patch_scores[rows, star]
    m_test = embeddings[rows, star].float()  # [B, D]
    m_star = bank[nearest[rows, star]]  # [B, D]
    to_star = (m_test - m_star).norm(dim=1)  # ||m_test* - m*||
    to_support = (m_test[:, None, :] - bank[neighbour_indices]).norm(dim=2)  # [B, b]
    # exp(a) / sum(exp(x)) = exp(a - logsumexp(x)): no overflow for large distances
    weight = 1.0 - torch.exp(to_star - torch.logsumexp(to_support, dim=1))
    return weight * s_star


def most_anomalous(patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Bank index of ``m*`` per image: the nearest bank item of the highest-scoring patch."""
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    return nearest[rows, patch_scores.argmax(1)]
