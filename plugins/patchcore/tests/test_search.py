"""Tests of the search strategies (vad_patchcore.knn): same protocol, same neighbours as brute
force where exact, high recall where approximate, and one resolver that picks them; and of the
cell-pruned exact search (vad_patchcore.pruned): same neighbours as brute force, and it prunes."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from vad.errors import VadError
from vad_patchcore import knn
from vad_patchcore.detector import PatchCore
from vad_patchcore.knn import BACKENDS, PRUNED_MIN_BANK, NearestNeighbours, SearchBackend, create_backend, faiss_available
from vad_patchcore.pruned import PrunedExactSearch, default_cells

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
EXACT = ["torch", "pruned", pytest.param("faiss", marks=needs_faiss)]
APPROXIMATE = [pytest.param("faiss-ivfflat", marks=needs_faiss), pytest.param("faiss-ivfpq", marks=needs_faiss)]
#: small IVF parameters for the tiny banks of these tests
IVF = {"ivf_lists": 32, "pq_subquantizers": 8, "pq_bits": 6, "ivf_probe": 8}


def clustered(count: int, dim: int, centres: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=generator) * 3
    labels = torch.randint(centres, (count,), generator=generator)
    return means[labels] + spread * torch.randn(count, dim, generator=generator)


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """float64 reference: squared distances and indices of the k nearest."""
    return torch.cdist(queries.double(), bank.double()).square().topk(k, dim=1, largest=False)


def true_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return (queries.double()[:, None, :] - bank.double()[indices]).square().sum(-1)


@pytest.mark.parametrize("name", EXACT + APPROXIMATE)
def test_every_backend_is_a_search_backend_with_the_same_protocol(name):
    bank = clustered(2500, 16, centres=20, seed=0)
    queries = clustered(50, 16, centres=20, seed=1)
    backend = create_backend(bank, name, **IVF)
    assert isinstance(backend, SearchBackend) and backend.name == name
    assert backend.exact == (name in ("torch", "pruned", "faiss")) and backend.oversample >= 1
    assert isinstance(backend.description, str) and backend.description
    distances, indices = backend.search(queries, 3)
    assert distances.shape == indices.shape == (50, 3) and indices.dtype == torch.long
    assert torch.all(distances[:, 1:] >= distances[:, :-1] - 1e-3)  # nearest first
    if name != "faiss-ivfpq":  # (its distances are those of the compressed codes)
        assert torch.allclose(distances.double(), true_distances(queries, bank, indices), rtol=1e-3, atol=1e-3)
    empty = backend.search(torch.zeros(0, 16), 2)
    assert empty[0].shape == (0, 2) and empty[1].shape == (0, 2)


@pytest.mark.parametrize("k", [1, 4])
def test_exact_backends_return_brute_force_neighbours_and_identical_distances(k):
    # Gaussian data: no near-ties, so every exact backend finds exactly the float64 indices
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(3000, 16, generator=generator)  # >= PRUNED_MIN_BANK: the pruning is active
    queries = torch.randn(400, 16, generator=generator) * 1.3
    reference = brute_force(queries, bank, k)
    results = {
        name: NearestNeighbours(bank, name, query_chunk=128).search(queries, k)
        for name in ("torch", "pruned", *(["faiss"] if faiss_available() else []))
    }
    for distances, indices in results.values():
        assert torch.equal(indices, reference.indices)
        assert torch.equal(distances, results["torch"][0])  # recomputed from the differences: identical
    assert torch.allclose(results["torch"][0].double(), reference.values, rtol=1e-5)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_approximate_backends_have_high_recall_and_exact_distances(name):
    bank = clustered(4000, 16, centres=40, seed=3)
    queries = clustered(300, 16, centres=40, seed=4, spread=0.35)
    reference = brute_force(queries, bank, 3)
    distances, indices = NearestNeighbours(bank, name, **IVF).search(queries, 3)
    assert (indices[:, 0] == reference.indices[:, 0]).double().mean() >= 0.9  # recall@1 (0.95-0.98 here)
    # re-ranked by the distances recomputed from the differences: true distances, ascending
    assert torch.allclose(distances.double(), true_distances(queries, bank, indices), rtol=1e-5)
    assert torch.all(distances[:, 1:] >= distances[:, :-1])


@needs_faiss
def test_ivfflat_probing_every_list_is_exact_and_missing_candidates_are_real_items():
    bank = clustered(2000, 12, centres=10, seed=5)
    queries = clustered(200, 12, centres=10, seed=6)
    everything = NearestNeighbours(bank, "faiss-ivfflat", ivf_lists=16, ivf_probe=16)
    assert everything.backend.description.startswith("faiss IndexIVFFlat (16 lists, 16 probed")
    _, indices = everything.search(queries, 2)
    assert torch.equal(indices, brute_force(queries, bank, 2).indices)
    # one probed list of a two-list bank holds fewer than k items: faiss pads with -1, which
    # must come back as real bank rows with their true distances, after the real candidates
    small = clustered(80, 12, centres=2, seed=7, spread=0.1)
    distances, indices = NearestNeighbours(small, "faiss-ivfflat", ivf_lists=2, ivf_probe=1).search(small[:5], 60)
    assert indices.min() >= 0 and indices.max() < 80
    assert torch.allclose(distances.double(), true_distances(small[:5], small, indices), rtol=1e-5)


def test_k_is_clipped_to_the_bank_and_empty_queries_are_fine():
    bank = torch.randn(5, 4)
    for name in ("torch", "pruned", *(["faiss", "faiss-ivfflat"] if faiss_available() else [])):
        search = NearestNeighbours(bank, name, ivf_lists=1)
        distances, indices = search.search(torch.randn(3, 4), 9)
        assert indices.shape == (3, 5) and sorted(indices[0].tolist()) == list(range(5))
        assert search.search(torch.zeros(0, 4), 2)[0].shape == (0, 2)


# ------------------------------------------------------------------ the resolver


def test_auto_prunes_large_banks_on_the_cpu_with_or_without_faiss(monkeypatch):
    large = torch.randn(PRUNED_MIN_BANK, 4)
    assert isinstance(create_backend(large), PrunedExactSearch)
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    assert create_backend(large, "auto").name == "pruned"


@needs_faiss
def test_auto_uses_faiss_for_small_banks_on_the_cpu():
    assert create_backend(torch.randn(PRUNED_MIN_BANK - 1, 4), "auto").name == "faiss"


def test_auto_falls_back_to_torch_without_faiss(monkeypatch):
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    assert create_backend(torch.randn(100, 4), "auto").name == "torch"


def test_auto_off_the_cpu_is_faiss_only_with_its_gpu_support(monkeypatch):
    # a stand-in for a CUDA bank: only its device and size are read before the backend is built
    gpu_bank = SimpleNamespace(device=torch.device("cuda", 0), shape=(PRUNED_MIN_BANK, 4))
    monkeypatch.setattr(knn, "TorchBruteForce", lambda bank, query_chunk: "torch")
    monkeypatch.setattr(knn, "FaissFlat", lambda bank: "faiss")
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    assert create_backend(gpu_bank) == "torch"  # never pruned off the CPU: one large product
    monkeypatch.setattr(knn, "faiss_available", lambda: True)
    monkeypatch.setitem(sys.modules, "faiss", SimpleNamespace())
    monkeypatch.setattr(knn, "_faiss_has_gpu", lambda faiss: False)
    assert create_backend(gpu_bank) == "torch"
    monkeypatch.setattr(knn, "_faiss_has_gpu", lambda faiss: True)
    assert create_backend(gpu_bank) == "faiss"


def test_explicit_names_are_taken_as_given():
    bank = torch.randn(100, 4)
    assert create_backend(bank, "pruned").name == "pruned"  # below PRUNED_MIN_BANK too
    assert create_backend(bank, "torch").name == "torch"
    assert set(BACKENDS) == {"auto", "pruned", "torch", "faiss", "faiss-ivfflat", "faiss-ivfpq"}


def test_unknown_backend_and_missing_faiss_are_clear_errors(monkeypatch):
    bank = torch.randn(100, 4)
    with pytest.raises(VadError, match="unknown knn_backend 'annoy'; choose one of auto, pruned, torch, faiss"):
        create_backend(bank, "annoy")
    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    for name in ("faiss", "faiss-ivfflat", "faiss-ivfpq"):
        with pytest.raises(VadError, match=f"knn_backend '{name}' needs faiss: `pip install faiss-cpu`"):
            NearestNeighbours(bank, name)
    detector = PatchCore(coreset_ratio=1.0, knn_backend="faiss-ivfflat")
    with pytest.raises(VadError, match="needs faiss"):  # the index is built at the end of fit
        detector.fit([torch.randn(2, 4, 3, 3)])


@needs_faiss
def test_detector_with_ivfflat_probing_every_list_scores_as_brute_force():
    generator = torch.Generator().manual_seed(8)
    train = [torch.randn(3, 12, 6, 6, generator=generator) for _ in range(4)]
    test = torch.randn(2, 12, 6, 6, generator=generator)
    predictions = []
    for options in ({"knn_backend": "faiss-ivfflat", "ivf_lists": 4, "ivf_probe": 4}, {"knn_backend": "torch"}):
        detector = PatchCore(coreset_ratio=0.5, **options)
        detector.fit(train)
        predictions.append(detector.predict(test))
    assert torch.equal(predictions[0].scores, predictions[1].scores)
    assert torch.equal(predictions[0].maps, predictions[1].maps)


# --------------------------------------------------------------------------- the pruned search


def assert_exact(
    search: PrunedExactSearch, queries: torch.Tensor, bank: torch.Tensor, k: int, same_indices: float = 0.97
) -> torch.Tensor:
    """The k items found for each query are at the k smallest distances, up to the float32
    rounding the search's tolerance allows; near-ties may swap, as in any float32 brute force,
    so only a share ``same_indices`` of the queries must get exactly the float64 indices."""
    _, indices = search.search(queries, k)
    found = (queries.double()[:, None, :] - bank.double()[indices]).square().sum(-1).sort(1).values
    reference = brute_force(queries, bank, k)
    centred_norms = (queries.double() - search.mean.double()).square().sum(1)
    tolerance = search.tolerance_scale * (centred_norms + search.squared_radius)
    assert torch.all((found - reference.values).abs() <= tolerance[:, None])
    assert (indices == reference.indices).all(1).double().mean() >= same_indices
    return indices


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("head_dims", [8, 0])
def test_pruned_finds_the_brute_force_neighbours(k, head_dims):
    generator = torch.Generator().manual_seed(12)
    bank = clustered(3000, 40, centres=25, seed=0)
    normal = clustered(200, 40, centres=25, seed=0) + 0.05 * torch.randn(200, 40, generator=generator)
    anomalous = 4 * torch.randn(100, 40, generator=generator)  # far from the bank
    search = PrunedExactSearch(bank, head_dims=head_dims, seed=3)
    assert_exact(search, torch.cat([normal, anomalous]), bank, k)
    assert 0 < search.scanned_fraction < 0.5  # exact, and most of the bank was never touched


def test_pruned_finds_the_brute_force_neighbours_on_a_patchcore_like_bank():
    # 152-dim clumpy features with the default head_dims (24): every bound is active (cells,
    # bisectors, the cheap head bound)
    bank = clustered(4000, 152, centres=40, seed=21, spread=0.5)
    generator = torch.Generator().manual_seed(22)
    queries = torch.cat([clustered(300, 152, centres=40, seed=21, spread=0.55), 2 * torch.randn(50, 152, generator=generator)])
    search = PrunedExactSearch(bank)
    assert search.head_dims == 24
    for k in (1, 9):
        assert_exact(search, queries, bank, k)
        assert 0 < search.scanned_fraction < 0.5


def test_pruned_finds_exactly_the_brute_force_indices_without_near_ties():
    generator = torch.Generator().manual_seed(13)
    bank = torch.randn(4000, 12, generator=generator)
    queries = torch.randn(500, 12, generator=generator)
    _, indices = PrunedExactSearch(bank).search(queries, 4)
    assert torch.equal(indices, brute_force(queries, bank, 4).indices)


def test_pruned_through_nearest_neighbours_is_identical_to_the_torch_backend():
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(5000, 16, generator=generator)
    queries = torch.randn(600, 16, generator=generator) * 1.3
    for k in (1, 4):
        d_pruned, i_pruned = NearestNeighbours(bank, "pruned").search(queries, k)
        d_torch, i_torch = NearestNeighbours(bank, "torch").search(queries, k)
        assert torch.equal(i_pruned, i_torch) and torch.equal(d_pruned, d_torch)


def test_pruned_with_cells_smaller_than_k_and_tiny_banks():
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(30, 6, generator=generator)
    queries = torch.randn(40, 6, generator=generator)
    search = PrunedExactSearch(bank, cells=15)  # about two items per cell, k = 5 spans cells
    assert_exact(search, queries, bank, 5)
    single = PrunedExactSearch(bank[:1])
    _, indices = single.search(queries, 3)  # k clipped to the bank
    assert indices.shape == (40, 1) and torch.all(indices == 0)
    empty = search.search(torch.zeros(0, 6), 2)
    assert empty[0].shape == (0, 2) and empty[1].shape == (0, 2)


def test_pruned_is_exact_when_norms_dwarf_the_distances():
    # items ~0.3 apart around centres of norm ~4e3: float32 expanded distances cannot tell the
    # items of one cluster apart (rounding ~60 in squared units), so only the distance check
    # applies; the tolerance must keep the right cluster from being pruned
    bank = clustered(2000, 16, centres=10, seed=6, spread=1e-3) * 300
    queries = bank[::7] + 2e-4 * torch.randn(bank[::7].shape, generator=torch.Generator().manual_seed(7))
    assert_exact(PrunedExactSearch(bank), queries, bank, 1, same_indices=0.0)


def test_pruned_build_is_deterministic_and_drops_empty_cells():
    bank = clustered(2500, 20, centres=12, seed=8)
    first, second = PrunedExactSearch(bank, seed=1), PrunedExactSearch(bank, seed=1)
    assert torch.equal(first.positions, second.positions) and torch.equal(first.centroids, second.centroids)
    assert int(first.cell_sizes.min()) >= 1 and int(first.cell_sizes.sum()) == 2500
    assert sorted(first.positions.tolist()) == list(range(2500))  # every bank row exactly once
    # the cells lie one after the other in the sorted bank
    assert torch.equal(first.cell_starts, first.cell_sizes.cumsum(0) - first.cell_sizes)
    for start, size in zip(first.cell_starts.tolist(), first.cell_sizes.tolist()):
        rows = bank[first.positions[start : start + size]] - first.mean
        assert torch.equal(first.items[start : start + size], rows)
    assert default_cells(15676) == 63 and default_cells(1) == 1


def test_detector_scores_are_identical_with_pruned_and_brute_force_search():
    generator = torch.Generator().manual_seed(9)
    train = [torch.randn(4, 24, 12, 12, generator=generator) for _ in range(6)]
    test = torch.randn(3, 24, 12, 12, generator=generator) * 1.2
    predictions = []
    for backend in ("pruned", "torch"):
        detector = PatchCore(coreset_ratio=0.5, num_neighbors=3, reweight=True, knn_backend=backend)
        detector.fit(train)
        assert detector.timings["fit_index"] >= 0.0
        predictions.append(detector.predict(test))
    assert torch.equal(predictions[0].scores, predictions[1].scores)
    assert torch.equal(predictions[0].maps, predictions[1].maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruned_on_cuda_matches_the_cpu():
    bank = clustered(4000, 32, centres=30, seed=10)
    queries = clustered(500, 32, centres=30, seed=11)
    _, on_cpu = PrunedExactSearch(bank).search(queries, 3)
    _, on_gpu = PrunedExactSearch(bank.cuda()).search(queries.cuda(), 3)
    assert torch.equal(on_cpu, on_gpu.cpu())


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("k", [1, 3])
def test_search_excluding_finds_the_nearest_rows_of_other_images(backend, k):
    bank = clustered(3000, 16, centres=20, seed=40)
    sources = torch.randint(0, 30, (3000,), generator=torch.Generator().manual_seed(41))
    queries = bank[:400] + 1e-3 * torch.randn(400, 16, generator=torch.Generator().manual_seed(42))  # own rows are nearest
    owners = sources[:400]
    distances, indices = NearestNeighbours(bank, backend).search_excluding(queries, owners, sources, k)
    assert (sources[indices] != owners[:, None]).all()
    full = torch.cdist(queries.double(), bank.double()).square()
    full[sources[None, :] == owners[:, None]] = float("inf")
    reference = full.topk(k, dim=1, largest=False)
    torch.testing.assert_close(distances.double(), reference.values, rtol=1e-4, atol=1e-4)
    assert (indices == reference.indices).all(1).double().mean() > 0.99


def test_search_excluding_falls_back_when_the_owner_fills_the_neighbourhood():
    bank = torch.cat([torch.zeros(40, 4), torch.ones(5, 4) * 3])  # 40 rows of image 0 at the query
    sources = torch.tensor([0] * 40 + [1] * 5)
    distances, indices = NearestNeighbours(bank, "torch").search_excluding(torch.zeros(2, 4), torch.tensor([0, 0]), sources, 2)
    assert (indices >= 40).all() and torch.allclose(distances, torch.full((2, 2), 36.0))
    with pytest.raises(VadError, match="needs at least 6 bank rows from other images, found 5"):
        NearestNeighbours(bank, "torch").search_excluding(torch.zeros(1, 4), torch.tensor([0]), sources, 6)
