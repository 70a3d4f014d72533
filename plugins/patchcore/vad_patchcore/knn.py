"""k-nearest-neighbour search of patch features in the memory bank.

Backends (all return *squared* L2 distances, ascending, and bank indices):

* ``"faiss"``: ``faiss.IndexFlatL2``, exact, as the official code's ``FaissNN``;
* ``"torch"``: exact brute force in chunks (``||q||^2 - 2 q.b + ||b||^2`` by one ``addmm`` per
  chunk of queries, then ``topk``); runs on the bank's device, so it is the GPU search on CUDA;
* ``"pruned"``: exact, :class:`vad_patchcore.pruned.PrunedExactSearch`: the bank partitioned into
  k-means cells, cells, blocks and pairs skipped by proven lower bounds; on the CPU its scan is
  the optional compiled ``vad_patchcore._scan`` (else torch); several times faster than brute
  force at PatchCore's bank sizes, same neighbours;
* ``"faiss-ivfpq"``: ``faiss.IndexIVFPQ`` (the official ``ApproximateFaissNN``: 512 lists, 64
  sub-quantizers of 8 bits; we clip the lists to the bank size and the sub-quantizers to a
  divisor of the dimension, probe ``ivf_probe`` lists and re-rank ``8 k`` candidates by exact
  distance). Approximate: for very large banks only; the benchmark measures its recall;
* ``"auto"``: on the CPU, ``"pruned"`` for banks of at least ``PRUNED_MIN_BANK`` items, below
  that faiss when importable, else torch; on CUDA, faiss when it has GPU support, else torch
  (one large matrix product is what a GPU does best).

Exact backends find the same neighbours; the distances they report are then recomputed from
the differences ``||q - b||^2`` of the found pairs, so faiss and torch return *identical*
numbers (and without the cancellation error of the expanded form).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from vad.errors import VadError
from vad_patchcore.pruned import PrunedExactSearch

BACKENDS = ("auto", "faiss", "torch", "pruned", "faiss-ivfpq")
#: Smallest bank for which "auto" prunes on the CPU: below it, the ~sqrt(M)/2 cells hold so few
#: items that the bounds hardly pay for themselves (a judgement, not measured at this size; the
#: 15,676-item bank of benchmarks/patchcore.py is where the speed-up was measured).
PRUNED_MIN_BANK = 2048
#: The IVF-PQ backend fetches ``k * PQ_RERANK`` candidates and keeps the ``k`` nearest by exact
#: distance (PQ distances are coarse; re-ranking recovers most of the recall for little time).
PQ_RERANK = 8


def faiss_available() -> bool:
    """True when the faiss Python package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _faiss_has_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def resolve_backend(backend: str, device: torch.device, bank_size: int = 0) -> str:
    """The concrete backend ``"auto"`` stands for on ``device`` for a bank of ``bank_size`` items;
    checks that it is installed."""
    if backend not in BACKENDS:
        raise VadError(f"unknown knn_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cpu" and bank_size >= PRUNED_MIN_BANK:
            return "pruned"
        if not faiss_available():
            return "torch"
        if device.type == "cpu":
            return "faiss"
        import faiss

        return "faiss" if _faiss_has_gpu(faiss) else "torch"
    if backend.startswith("faiss") and not faiss_available():
        raise VadError(
            f"knn_backend {backend!r} needs faiss: `pip install faiss-cpu` (or faiss-gpu), "
            "or use knn_backend='pruned' or 'torch' (exact, same results as 'faiss')"
        )
    return backend


class NearestNeighbours:
    """A searchable memory bank: ``search(queries, k) -> (squared distances [n, k], indices [n, k])``.

    ``bank`` is ``[M, D]`` float32 on the device the search runs on. ``query_chunk`` bounds the
    torch backend's temporary ``[query_chunk, M]`` distance matrix.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        backend: str = "auto",
        query_chunk: int = 4096,
        ivf_lists: int = 512,
        pq_subquantizers: int = 64,
        pq_bits: int = 8,
        ivf_probe: int = 8,
        seed: int = 0,
    ) -> None:
        self.bank = bank.float().contiguous()
        self.backend = resolve_backend(backend, bank.device, bank.shape[0])
        self.query_chunk = query_chunk
        self._bank_norms = (self.bank * self.bank).sum(1)
        self._index: Any = None
        self._pruned: PrunedExactSearch | None = None
        if self.backend.startswith("faiss"):
            self._index = self._build_faiss(ivf_lists, pq_subquantizers, pq_bits, ivf_probe, seed)
        elif self.backend == "pruned":
            self._pruned = PrunedExactSearch(self.bank, seed=seed)

    @property
    def description(self) -> str:
        """The backend, and for ``pruned`` which scan it runs (for logs and benchmark tables)."""
        if self._pruned is None:
            return self.backend
        return f"pruned ({'compiled' if self._pruned.native else 'torch'} scan)"

    def _build_faiss(self, ivf_lists: int, pq_subquantizers: int, pq_bits: int, ivf_probe: int, seed: int) -> Any:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # respect the user's thread setting
        bank = self.bank.detach().cpu().numpy()
        dim = bank.shape[1]
        if self.backend == "faiss":
            index = faiss.IndexFlatL2(dim)
        else:
            # faiss wants >= 39 training points per list; sub-quantizers must divide the dimension
            lists = max(1, min(ivf_lists, bank.shape[0] // 39))
            subquantizers = max(s for s in range(1, min(pq_subquantizers, dim) + 1) if dim % s == 0)
            index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, lists, subquantizers, pq_bits)
            index.cp.seed = seed
            index.train(bank)
            index.nprobe = min(ivf_probe, lists)
        if self.bank.device.type == "cuda" and _faiss_has_gpu(faiss):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), self.bank.device.index or 0, index)
        index.add(bank)
        return index

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query row: squared distances and indices, ``[n, k]``."""
        queries = queries.to(self.bank.device, torch.float32)
        k = min(k, self.bank.shape[0])
        if self._index is not None:
            import numpy as np

            wanted = k if self.backend == "faiss" else min(k * PQ_RERANK, self.bank.shape[0])
            _, found = self._index.search(np.ascontiguousarray(queries.detach().cpu().numpy()), wanted)
            indices = torch.from_numpy(found).to(self.bank.device)
            if self.backend == "faiss-ivfpq":
                indices = indices.clamp_min(0)  # -1 = fewer candidates than asked in the probed lists
        elif self._pruned is not None:
            indices = self._pruned.search(queries, k)[1]
        else:
            indices = self._torch_search(queries, k)
        # recompute the distances of the found pairs from their differences: identical numbers
        # whatever the backend, and exact even for far-away points
        distances = torch.cat(
            [
                # (x - q)^2 = (q - x)^2 exactly; gathered by index_select and subtracted in place:
                # 2-3x faster than advanced indexing and a fresh difference tensor on the CPU
                self.bank.index_select(0, found.reshape(-1))
                .view(*found.shape, -1)
                .sub_(queries[start : start + self.query_chunk, None, :])
                .square_()
                .sum(-1)
                for start, found in zip(range(0, queries.shape[0], self.query_chunk), indices.split(self.query_chunk))
            ]
        ) if queries.shape[0] else torch.zeros(0, k, device=self.bank.device)
        if self.backend == "faiss-ivfpq":  # re-rank the PQ candidates by their exact distances
            distances, order = distances.topk(k, dim=1, largest=False)
            indices = indices.gather(1, order)
        return distances, indices

    def _torch_search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        found = []
        for start in range(0, queries.shape[0], self.query_chunk):
            chunk = queries[start : start + self.query_chunk]
            # ||q||^2 is constant per row: not needed to rank the bank rows
            partial = torch.addmm(self._bank_norms[None], chunk, self.bank.T, alpha=-2.0)
            if k == 1:
                found.append(partial.argmin(1, keepdim=True))
            else:
                found.append(partial.topk(k, dim=1, largest=False).indices)
        return torch.cat(found) if found else torch.zeros(0, k, dtype=torch.long, device=self.bank.device)
