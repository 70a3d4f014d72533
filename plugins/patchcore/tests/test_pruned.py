"""Tests of the cell-pruned exact search: same neighbours as brute force, and it does prune."""

from __future__ import annotations

import pytest
import torch

from vad_patchcore.detector import PatchCore
from vad_patchcore.knn import PRUNED_MIN_BANK, NearestNeighbours, resolve_backend
from vad_patchcore.pruned import PrunedExactSearch, default_cells


def clustered(count: int, dim: int, centres: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    """Points around ``centres`` random centres (the shape of real patch features: clumpy)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=generator) * 3
    labels = torch.randint(centres, (count,), generator=generator)
    return means[labels] + spread * torch.randn(count, dim, generator=generator)


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """float64 reference: squared distances and indices of the k nearest."""
    return torch.cdist(queries.double(), bank.double()).square().topk(k, dim=1, largest=False)


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
    assert default_cells(15676) == 63 and default_cells(1) == 1


def test_auto_backend_prunes_large_banks_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, PRUNED_MIN_BANK) == "pruned"
    assert resolve_backend("auto", cpu, PRUNED_MIN_BANK - 1) in ("faiss", "torch")
    assert resolve_backend("pruned", cpu, 10) == "pruned"


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
