"""k-nearest-neighbour search of patch features in the memory bank, as small strategies.

Each backend is a :class:`SearchBackend`: built once from the bank, then ``search(queries, k)
-> (squared distances [n, k], indices [n, k])``, nearest first.

* ``"torch"`` (:class:`TorchBruteForce`): exact brute force in chunks of queries; runs on the
  bank's device, so it is the GPU search on CUDA;
* ``"pruned"`` (:class:`vad_patchcore.pruned.PrunedExactSearch`): exact, skips most of the bank
  by proven lower bounds (k-means cells); the CPU default for large banks;
* ``"faiss"`` (:class:`FaissFlat`): ``faiss.IndexFlatL2``, exact, as the official ``FaissNN``;
* ``"faiss-ivfflat"`` (:class:`FaissIVFFlat`): ``faiss.IndexIVFFlat``, approximate: only the
  items of the ``ivf_probe`` inverted lists nearest to the query are compared (exactly);
* ``"faiss-ivfpq"`` (:class:`FaissIVFPQ`): ``faiss.IndexIVFPQ``, approximate, as the official
  ``ApproximateFaissNN`` (512 lists, 64 sub-quantizers of 8 bits); ranks by compressed codes,
  so ``PQ_RERANK * k`` candidates are fetched and re-ranked by exact distance.

:func:`create_backend` is the one place that picks and builds a backend (``"auto"``: the fastest
exact one for the device and bank size). :class:`NearestNeighbours` holds it and recomputes
the distances of the pairs found from their differences ``||q - b||^2``: exact backends then
return *identical* numbers (without the cancellation error of the expanded form), and the
approximate ones are re-ranked by these exact distances.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol, runtime_checkable

import torch

from vad.errors import VadError
from vad_patchcore.pruned import PrunedExactSearch

BACKENDS = ("auto", "pruned", "torch", "faiss", "faiss-ivfflat", "faiss-ivfpq")
#: Smallest bank for which "auto" prunes on the CPU: below it, the ~sqrt(M)/2 cells hold so few
#: items that the bounds hardly pay for themselves (a judgement; the speed-up was measured on
#: benchmarks/patchcore.py's larger bank).
PRUNED_MIN_BANK = 2048
#: The IVF-PQ backend fetches ``k * PQ_RERANK`` candidates and keeps the ``k`` nearest by exact
#: distance (PQ distances are coarse; re-ranking recovers most of the recall for little time).
PQ_RERANK = 8
#: Leave-one-image-out searches ask the index for this many neighbours beyond k, then drop the
#: query's own image's rows (see :meth:`NearestNeighbours.search_excluding`).
EXCLUSION_MARGIN = 16
#: Bank distances computed at once by the brute-force fallback of the excluding search.
EXCLUSION_BLOCK = 1 << 24
#: faiss wants at least this many training points per inverted list (it warns below).
IVF_POINTS_PER_LIST = 39


@runtime_checkable
class SearchBackend(Protocol):
    """A search strategy over a fixed bank ``[M, D]``."""

    #: the ``knn_backend`` value that selects it
    name: str
    #: True when it always finds the true nearest items (up to float32 ties)
    exact: bool
    #: candidates to fetch per wanted neighbour; :class:`NearestNeighbours` keeps the nearest by
    #: exact distance
    oversample: int

    @property
    def description(self) -> str:
        """The backend and its parameters, for logs and benchmark tables."""
        ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query: ``(squared distances, indices)``, ``[n, k]``."""
        ...


def faiss_available() -> bool:
    """True when the faiss Python package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def _faiss_has_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def create_backend(
    bank: torch.Tensor,
    backend: str = "auto",
    *,
    query_chunk: int = 4096,
    ivf_lists: int = 512,
    pq_subquantizers: int = 64,
    pq_bits: int = 8,
    ivf_probe: int = 8,
    seed: int = 0,
) -> SearchBackend:
    """The search strategy ``backend`` names, built for ``bank`` (float32 ``[M, D]`` on the
    device the search runs on).

    ``"auto"``: on the CPU, ``"pruned"`` for banks of at least :data:`PRUNED_MIN_BANK` items,
    below that ``"faiss"`` when importable, else ``"torch"``; on other devices, ``"faiss"`` when
    it has GPU support, else ``"torch"`` (one large matrix product is what a GPU does best).
    """
    if backend not in BACKENDS:
        raise VadError(f"unknown knn_backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cpu = bank.device.type == "cpu"
    if backend == "auto":
        if cpu and bank.shape[0] >= PRUNED_MIN_BANK:
            backend = "pruned"
        elif not faiss_available():
            backend = "torch"
        else:
            import faiss

            backend = "faiss" if cpu or _faiss_has_gpu(faiss) else "torch"
    elif backend.startswith("faiss") and not faiss_available():
        raise VadError(
            f"knn_backend {backend!r} needs faiss: `pip install faiss-cpu` (or faiss-gpu), "
            "or use knn_backend='pruned' or 'torch' (exact, same results as 'faiss')"
        )
    if backend == "torch":
        return TorchBruteForce(bank, query_chunk)
    if backend == "pruned":
        return PrunedExactSearch(bank, seed=seed)
    if backend == "faiss":
        return FaissFlat(bank)
    if backend == "faiss-ivfflat":
        return FaissIVFFlat(bank, ivf_lists, ivf_probe, seed)
    return FaissIVFPQ(bank, ivf_lists, pq_subquantizers, pq_bits, ivf_probe, seed)


class TorchBruteForce:
    """Exact brute force: ``||q||^2 - 2 q.b + ||b||^2`` by one ``addmm`` per chunk of
    ``query_chunk`` queries (bounding the ``[query_chunk, M]`` distance block), then ``topk``."""

    name = "torch"
    exact = True
    oversample = 1
    description = "torch (exact, brute force)"

    def __init__(self, bank: torch.Tensor, query_chunk: int = 4096) -> None:
        self.bank = bank.float().contiguous()
        self.query_chunk = query_chunk
        self._bank_norms = self.bank.square().sum(1)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query (expanded-form squared distances)."""
        queries = queries.to(self.bank.device, torch.float32)
        k = min(k, self.bank.shape[0])
        values, found = [], []
        for chunk in queries.split(self.query_chunk):  # (one empty chunk for no queries)
            # ||q||^2 is constant per row: added after ranking
            partial = torch.addmm(self._bank_norms[None], chunk, self.bank.T, alpha=-2.0)
            nearest, indices = partial.min(1, keepdim=True) if k == 1 else partial.topk(k, dim=1, largest=False)
            values.append(nearest.add_(chunk.square().sum(1, keepdim=True)).clamp_min_(0.0))
            found.append(indices)
        return torch.cat(values), torch.cat(found)


class _FaissSearch:
    """A faiss index of the bank, on the bank's GPU where faiss has GPU support. Searches on the
    index's device and returns tensors on the bank's device."""

    exact = True
    oversample = 1

    def __init__(self, bank: torch.Tensor, index: Any, probe: int = 1, seed: int = 0) -> None:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # respect the user's thread setting
        self.device = bank.device
        rows = bank.detach().float().cpu().numpy()
        if not index.is_trained:  # the IVF indexes: k-means for the inverted lists
            index.cp.seed = seed
            index.train(rows)
            index.nprobe = min(probe, index.nlist)
        if bank.device.type == "cuda" and _faiss_has_gpu(faiss):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), bank.device.index or 0, index)
        index.add(rows)
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query, as faiss ranks them."""
        import numpy as np

        distances, found = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        # -1: the probed inverted lists held fewer than k items; item 0 stands in (a real bank
        # item, so the re-ranked result holds true distances to real items)
        indices = torch.from_numpy(found).clamp_min_(0)
        return torch.from_numpy(distances).to(self.device), indices.to(self.device)


def _ivf_lists(bank_size: int, lists: int) -> int:
    """``lists`` clipped to the bank size (faiss's minimum training points per list)."""
    return max(1, min(lists, bank_size // IVF_POINTS_PER_LIST))


class FaissFlat(_FaissSearch):
    """``faiss.IndexFlatL2``: exact brute force (the official code's ``FaissNN``)."""

    name = "faiss"
    description = "faiss IndexFlatL2 (exact)"

    def __init__(self, bank: torch.Tensor) -> None:
        import faiss

        super().__init__(bank, faiss.IndexFlatL2(bank.shape[1]))


class FaissIVFFlat(_FaissSearch):
    """``faiss.IndexIVFFlat``: the bank split into ``lists`` k-means lists (clipped to the bank
    size); a query is compared exactly with the items of its ``probe`` nearest lists only."""

    name = "faiss-ivfflat"
    exact = False

    def __init__(self, bank: torch.Tensor, lists: int = 512, probe: int = 8, seed: int = 0) -> None:
        import faiss

        dim = bank.shape[1]
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, _ivf_lists(bank.shape[0], lists))
        super().__init__(bank, index, probe, seed)

    @property
    def description(self) -> str:
        """Lists and probes."""
        return f"faiss IndexIVFFlat ({self.index.nlist} lists, {self.index.nprobe} probed; approximate)"


class FaissIVFPQ(_FaissSearch):
    """``faiss.IndexIVFPQ`` (the official ``ApproximateFaissNN``): inverted lists of
    product-quantized codes, ``subquantizers`` (clipped to a divisor of D) of ``bits`` bits.
    Ranks by the coarse codes, so it asks for :data:`PQ_RERANK` candidates per neighbour."""

    name = "faiss-ivfpq"
    exact = False
    oversample = PQ_RERANK

    def __init__(
        self, bank: torch.Tensor, lists: int = 512, subquantizers: int = 64, bits: int = 8, probe: int = 8, seed: int = 0
    ) -> None:
        import faiss

        dim = bank.shape[1]
        subquantizers = max(s for s in range(1, min(subquantizers, dim) + 1) if dim % s == 0)
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, _ivf_lists(bank.shape[0], lists), subquantizers, bits)
        super().__init__(bank, index, probe, seed)
        self.subquantizers, self.bits = subquantizers, bits

    @property
    def description(self) -> str:
        """Lists, probes and code size."""
        return (
            f"faiss IndexIVFPQ ({self.index.nlist} lists, {self.index.nprobe} probed, {self.subquantizers} x "
            f"{self.bits} bits, {PQ_RERANK}x re-ranked; approximate)"
        )


class NearestNeighbours:
    """A searchable memory bank: the chosen :class:`SearchBackend` plus the exact distances.

    ``bank`` is ``[M, D]`` float32 on the device the search runs on; the other arguments are
    :func:`create_backend`'s. ``search(queries, k) -> (squared distances [n, k], indices [n, k])``.
    """

    def __init__(self, bank: torch.Tensor, backend: str = "auto", query_chunk: int = 4096, **backend_options: Any) -> None:
        self.bank = bank.float().contiguous()
        self.query_chunk = query_chunk
        self.backend: SearchBackend = create_backend(self.bank, backend, query_chunk=query_chunk, **backend_options)

    @property
    def description(self) -> str:
        """The backend in use, with its parameters."""
        return self.backend.description

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query row: squared distances and indices, ``[n, k]``."""
        queries = queries.to(self.bank.device, torch.float32)
        k = min(k, self.bank.shape[0])
        if queries.shape[0] == 0:
            return torch.zeros(0, k, device=self.bank.device), torch.zeros(0, k, dtype=torch.long, device=self.bank.device)
        _, indices = self.backend.search(queries, min(k * self.backend.oversample, self.bank.shape[0]))
        # the distances of the found pairs recomputed from their differences: identical numbers
        # whatever the backend, and exact even for far-away points
        distances = torch.cat([
            # (x - q)^2 = (q - x)^2 exactly; gathered by index_select and subtracted in place
            # (on the CPU cheaper than advanced indexing and a fresh difference tensor)
            self.bank.index_select(0, found.reshape(-1))
            .view(*found.shape, -1)
            .sub_(queries[start : start + self.query_chunk, None, :])
            .square_()
            .sum(-1)
            for start, found in zip(range(0, queries.shape[0], self.query_chunk), indices.split(self.query_chunk))
        ])
        if not self.backend.exact:  # the approximate backends' candidates, re-ranked by exact distance
            distances, order = distances.topk(k, dim=1, largest=False)
            indices = indices.gather(1, order)
        return distances, indices

    def search_excluding(self, queries: torch.Tensor, owners: torch.Tensor, sources: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`search` among the bank rows whose ``sources`` entry differs from the query's
        ``owners`` entry (a training image scored without its own patches: leave-one-image-out).

        The index is asked for ``k + EXCLUSION_MARGIN`` neighbours and the owner's rows are
        dropped; queries with fewer than ``k`` others among them are searched by brute force over
        the bank without their owner's rows, so the result is what an index built without them
        would return (up to the approximate backends' own misses).
        """
        queries = queries.to(self.bank.device, torch.float32)
        owners, sources = owners.to(self.bank.device), sources.to(self.bank.device)
        others = int((sources != owners[:, None]).sum(1).min()) if queries.shape[0] else 0
        if others < k:
            raise VadError(f"leave-one-image-out search needs at least {k} bank rows from other images, found {others}")
        wanted = min(k + EXCLUSION_MARGIN, self.bank.shape[0])
        distances, indices = self.search(queries, wanted)
        allowed = sources[indices] != owners[:, None]
        # the first k allowed columns of each row, in ascending distance (stable sort keeps order)
        rank = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)[:, :k]
        distances, indices = distances.gather(1, rank), indices.gather(1, rank)
        short = allowed.sum(1) < k
        for owner in owners[short].unique().tolist():
            kept = torch.nonzero(sources != owner).flatten()
            others_bank = self.bank[kept]
            rows_all = torch.nonzero(short & (owners == owner)).flatten()
            step = max(1, EXCLUSION_BLOCK // max(1, kept.numel()))  # bounds the [rows, bank] block
            for rows in rows_all.split(step):
                block = torch.addmm((others_bank * others_bank).sum(1)[None], queries[rows], others_bank.T, alpha=-2.0)
                found = kept[block.topk(k, dim=1, largest=False).indices]
                indices[rows] = found
                distances[rows] = self.bank[found].sub_(queries[rows, None, :]).square_().sum(-1)
        order = distances.argsort(dim=1)  # the brute-force rows came in expanded-form order
        return distances.gather(1, order), indices.gather(1, order)
