"""PatchCore scoring as one traceable module, for ``vad export`` (ONNX).

The memory bank is a constant of the graph. Nearest neighbours are exact: ranked by
``||b||^2 - 2 q.b`` (the torch backend's matmul) and their distances recomputed from the
differences, as :meth:`vad_patchcore.knn.NearestNeighbours.search` does, so the exported
scores match ``PatchCore.predict`` with any exact backend. The approximate backends
(faiss-ivfflat, faiss-ivfpq) are not exported: the graph always searches the whole bank.
"""

from __future__ import annotations

import torch

from vad_patchcore.scoring import max_scores, most_anomalous, reweighted_scores


class PatchCoreHead(torch.nn.Module):
    """Feature grids ``[B, D, h, w]`` -> image scores ``[B]`` and patch-score maps ``[B, h, w]``."""

    def __init__(
        self,
        memory_bank: torch.Tensor,
        num_neighbors: int = 1,
        distance: str = "euclidean",
        reweight_neighbors: int | None = None,
    ) -> None:
        super().__init__()
        bank = memory_bank.detach().to("cpu", torch.float32).contiguous()
        self.register_buffer("bank", bank)
        self.register_buffer("bank_norms", bank.square().sum(1))
        self.num_neighbors = min(int(num_neighbors), bank.shape[0])
        self.squared = distance == "squared"
        #: ``b`` of the paper's Eq. 7, or None for the plain maximum.
        self.reweight_neighbors = None if reweight_neighbors is None else min(int(reweight_neighbors), bank.shape[0])

    def _nearest(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        partial = self.bank_norms[None] - 2.0 * (queries @ self.bank.T)
        indices = partial.topk(k, dim=1, largest=False).indices
        return (queries[:, None, :] - self.bank[indices]).square().sum(-1), indices

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size, dim, height, width = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, dim).float()
        squared, nearest = self._nearest(queries, self.num_neighbors)
        distances = squared if self.squared else squared.sqrt()
        patch_scores = distances.mean(1).reshape(size, height * width)
        if self.reweight_neighbors is None:
            scores = max_scores(patch_scores)
        else:
            nearest_first = nearest[:, 0].reshape(size, height * width)
            _, support = self._nearest(self.bank[most_anomalous(patch_scores, nearest_first)], self.reweight_neighbors)
            scores = reweighted_scores(
                patch_scores, nearest_first, queries.reshape(size, height * width, dim), self.bank, support
            )
        return scores, patch_scores.reshape(size, height, width)
