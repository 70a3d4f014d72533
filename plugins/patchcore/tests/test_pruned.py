"""Tests of the cell-pruned exact search: same neighbours as brute force, and it does prune.

Every search test runs with both scans: ``native=False`` (torch) and ``native=True`` (the
compiled ``vad_patchcore._scan``; skipped where it is not built, and a test below makes sure it is
built wherever a C++ compiler exists), the compiled one with each of its kernels: the one
``isa()`` picks and the portable one.
"""

from __future__ import annotations

import shutil
import sysconfig

import pytest
import torch

from vad.errors import VadError
from vad_patchcore import pruned
from vad_patchcore.detector import PatchCore
from vad_patchcore.knn import PRUNED_MIN_BANK, NearestNeighbours, resolve_backend
from vad_patchcore.pruned import LANES, PrunedExactSearch, default_cells

needs_native = pytest.mark.skipif(not pruned.native_available(), reason="vad_patchcore._scan is not built")
SCANS = [
    pytest.param(False, id="torch-scan"),
    pytest.param(True, id="compiled-scan", marks=needs_native),
    pytest.param("portable", id="compiled-scan-portable-kernel", marks=needs_native),
]


def build(bank: torch.Tensor, native: bool | str, **options) -> PrunedExactSearch:
    """The search of ``bank`` with the scan of a SCANS value."""
    search = PrunedExactSearch(bank, native=bool(native), **options)
    if native == "portable":
        search.kernel = "portable"
    return search


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


@pytest.mark.parametrize("native", SCANS)
@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("head_dims", [8, 0])
def test_pruned_finds_the_brute_force_neighbours(k, head_dims, native):
    generator = torch.Generator().manual_seed(12)
    bank = clustered(3000, 40, centres=25, seed=0)
    normal = clustered(200, 40, centres=25, seed=0) + 0.05 * torch.randn(200, 40, generator=generator)
    anomalous = 4 * torch.randn(100, 40, generator=generator)  # far from the bank
    search = build(bank, native, head_dims=head_dims, seed=3)
    assert search.native == bool(native)
    assert_exact(search, torch.cat([normal, anomalous]), bank, k)
    assert 0 < search.scanned_fraction < 0.5  # exact, and most of the bank was never touched


@pytest.mark.parametrize("native", SCANS)
def test_pruned_finds_exactly_the_brute_force_indices_without_near_ties(native):
    generator = torch.Generator().manual_seed(13)
    bank = torch.randn(4000, 12, generator=generator)
    queries = torch.randn(500, 12, generator=generator)
    _, indices = build(bank, native).search(queries, 4)
    assert torch.equal(indices, brute_force(queries, bank, 4).indices)


@pytest.mark.parametrize("native", SCANS[1:])
def test_each_query_gets_the_same_neighbours_whatever_it_is_searched_with(native):
    # the compiled scan takes consecutive queries four at a time (the rest one by one), visiting
    # the cells and blocks any of them needs: a query's result must not depend on its company
    # (the torch scan's batched products round differently with the batch, so not for it)
    bank = clustered(3000, 40, centres=25, seed=14)
    generator = torch.Generator().manual_seed(15)
    queries = torch.cat([clustered(150, 40, centres=25, seed=16), 3 * torch.randn(53, 40, generator=generator)])
    search = build(bank, native)
    # (indices: the distances may differ in the last bit, as torch rotates one query and a batch
    # of them with different products)
    together = search.search(queries, 3)[1]
    assert torch.equal(together, torch.cat([search.search(query[None], 3)[1] for query in queries]))
    order = torch.randperm(queries.shape[0], generator=generator)
    assert torch.equal(search.search(queries[order], 3)[1], together[order])
    assert_exact(search, queries, bank, 3)


def test_pruned_through_nearest_neighbours_is_identical_to_the_torch_backend():
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(5000, 16, generator=generator)
    queries = torch.randn(600, 16, generator=generator) * 1.3
    for k in (1, 4):
        d_pruned, i_pruned = NearestNeighbours(bank, "pruned").search(queries, k)
        d_torch, i_torch = NearestNeighbours(bank, "torch").search(queries, k)
        assert torch.equal(i_pruned, i_torch) and torch.equal(d_pruned, d_torch)


@pytest.mark.parametrize("native", SCANS)
def test_pruned_with_cells_smaller_than_k_and_tiny_banks(native):
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(30, 6, generator=generator)
    queries = torch.randn(40, 6, generator=generator)
    search = build(bank, native, cells=15)  # about two items per cell, k = 5 spans cells
    assert_exact(search, queries, bank, 5)
    single = build(bank[:1], native)
    _, indices = single.search(queries, 3)  # k clipped to the bank
    assert indices.shape == (40, 1) and torch.all(indices == 0)
    empty = search.search(torch.zeros(0, 6), 2)
    assert empty[0].shape == (0, 2) and empty[1].shape == (0, 2)


@pytest.mark.parametrize("native", SCANS)
def test_pruned_is_exact_when_norms_dwarf_the_distances(native):
    # items ~0.3 apart around centres of norm ~4e3: float32 expanded distances cannot tell the
    # items of one cluster apart (rounding ~60 in squared units), so only the distance check
    # applies; the tolerance must keep the right cluster from being pruned
    bank = clustered(2000, 16, centres=10, seed=6, spread=1e-3) * 300
    queries = bank[::7] + 2e-4 * torch.randn(bank[::7].shape, generator=torch.Generator().manual_seed(7))
    assert_exact(build(bank, native), queries, bank, 1, same_indices=0.0)


@pytest.mark.parametrize("native", SCANS)
def test_pruned_build_is_deterministic_and_drops_empty_cells(native):
    bank = clustered(2500, 20, centres=12, seed=8)
    first, second = build(bank, native, seed=1), build(bank, native, seed=1)
    assert torch.equal(first.positions, second.positions) and torch.equal(first.centroids, second.centroids)
    assert int(first.cell_sizes.min()) >= 1 and int(first.cell_sizes.sum()) == 2500
    stored = first.positions[first.positions >= 0]
    assert sorted(stored.tolist()) == list(range(2500))  # every bank row exactly once, the rest padding
    if native:  # each cell starts a block of LANES slots and holds its rows there
        assert torch.all(first.cell_starts % LANES == 0) and torch.all(first.cell_blocks * LANES >= first.cell_sizes)
    else:  # the cells lie one after the other in the sorted bank
        assert torch.equal(first.cell_starts, first.cell_sizes.cumsum(0) - first.cell_sizes)
    for start, size in zip(first.cell_starts.tolist(), first.cell_sizes.tolist()):
        rows = bank[first.positions[start : start + size]] - first.mean
        assert torch.all(first.positions[start : start + size] >= 0)
        if native:  # the compiled scan's panels hold the rows rotated into the principal axes
            slots = torch.arange(start, start + size)
            stored = first._panels[:, slots // LANES, :, slots % LANES].reshape(size, -1)  # [item, chunk * LANES]
            assert torch.allclose(stored[:, :20], rows @ first.rotation, atol=1e-5)
            assert torch.all(stored[:, 20:] == 0)
        else:
            assert torch.equal(first.items[start : start + size, :20], rows)
    if native:  # padding lanes are NaN: they never pass a comparison
        padding = (first.positions < 0).nonzero()[:, 0]
        assert torch.all(first._panels[:, padding // LANES, :, padding % LANES].isnan())
        assert torch.all(first._item_squares[padding].isnan())
        slots = (first.positions >= 0).nonzero()[:, 0]  # the squared norms of the stored rows
        stored = first._panels[:, slots // LANES, :, slots % LANES].reshape(slots.numel(), -1)
        assert torch.allclose(first._item_squares[slots], stored.square().sum(1), rtol=1e-5)
    assert default_cells(15676) == 63 and default_cells(1) == 1


def test_nearest_neighbours_says_which_scan_the_pruned_backend_runs(monkeypatch):
    bank = torch.randn(3000, 40)
    expected = "pruned (compiled scan)" if pruned.native_preferred() else "pruned (torch scan)"
    assert NearestNeighbours(bank, "pruned").description == expected
    monkeypatch.setattr(pruned, "native_scan", None)
    assert NearestNeighbours(bank, "pruned").description == "pruned (torch scan)"
    assert NearestNeighbours(bank, "torch").description == "torch"


def test_auto_backend_prunes_large_banks_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, PRUNED_MIN_BANK) == "pruned"
    assert resolve_backend("auto", cpu, PRUNED_MIN_BANK - 1) in ("faiss", "torch")
    assert resolve_backend("pruned", cpu, 10) == "pruned"


def test_native_scan_is_built_where_a_compiler_exists():
    # setup.py builds the extension as optional: a failed build must not go unnoticed where it
    # should have worked (this machine and CI have g++)
    compiler = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the torch scan is the search here")
    assert pruned.native_available()


@needs_native
def test_compiled_and_torch_scans_find_the_same_neighbours_on_a_patchcore_like_bank():
    # 152-dim clumpy features, a bank of 4,000, head_dims 24 as the defaults: every bound of both
    # scans is active (cells, blocks, the cheap head bound)
    bank = clustered(4000, 152, centres=40, seed=21, spread=0.5)
    queries = torch.cat([clustered(600, 152, centres=40, seed=21, spread=0.55), 2 * torch.randn(100, 152)])
    for k in (1, 9):
        compiled = PrunedExactSearch(bank, native=True)
        torch_scan = PrunedExactSearch(bank, native=False)
        d_compiled, i_compiled = compiled.search(queries, k)
        d_torch, i_torch = torch_scan.search(queries, k)
        assert (i_compiled == i_torch).all(1).double().mean() >= 0.99  # near-ties may swap
        tolerance = compiled.tolerance_scale * ((queries - compiled.mean).square().sum(1) + compiled.squared_radius)
        assert torch.all((d_compiled - d_torch).abs() <= tolerance[:, None])
        assert 0 < compiled.scanned_fraction < 0.5  # most blocks are never begun
        assert_exact(compiled, queries, bank, k)


def test_without_the_compiled_scan_the_torch_scan_runs_and_native_true_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(pruned, "native_scan", None)
    bank = clustered(2000, 40, centres=10, seed=4)
    search = PrunedExactSearch(bank)  # native=None: what is available
    assert search.native is False
    assert_exact(search, bank[:50] + 0.01, bank, 2)
    with pytest.raises(VadError, match="compiled pruned scan needs a CPU bank and the vad_patchcore._scan module"):
        PrunedExactSearch(bank, native=True)


def test_the_compiled_scan_is_the_default_only_with_its_avx512_code(monkeypatch):
    class Built:  # stands in for the extension: only isa() is asked before a search
        def __init__(self, isa):
            self.isa = lambda: isa

    bank = clustered(500, 40, centres=5, seed=3)
    monkeypatch.setattr(pruned, "native_scan", Built("portable"))
    assert pruned.native_available() and not pruned.native_preferred()
    assert PrunedExactSearch(bank).native is False  # the portable kernel is slower than the torch scan
    monkeypatch.setattr(pruned, "native_scan", Built("avx512"))
    assert pruned.native_preferred()


@needs_native
def test_compiled_scan_reports_its_instruction_set():
    assert pruned.native_scan.isa() in ("avx512", "portable")
    assert PrunedExactSearch(torch.randn(300, 40)).native == (pruned.native_scan.isa() == "avx512")


@needs_native
def test_compiled_scan_checks_its_arguments():
    def scan(row=16, head_dims=4, cells=2, bisectors=2, dim=12, k=1, threads=1, kernel="portable"):
        # 11 bank pointers, 7 bank sizes, 5 query pointers, count, k, threads, kernel (_scan.cpp);
        # all are checked before any pointer is read
        sizes = (row, head_dims, cells, bisectors, 1, 1, dim)
        return pruned.native_scan.scan(*([0] * 11), *sizes, *([0] * 5), 1, k, threads, kernel)

    for bad in (
        {"row": 10}, {"head_dims": 16}, {"head_dims": -1}, {"dim": 0}, {"dim": 17},
        {"bisectors": 3}, {"bisectors": 0}, {"k": 0}, {"threads": 0},
    ):
        with pytest.raises(ValueError, match="multiple of 16"):
            scan(**bad)
    with pytest.raises(ValueError, match='kernel must be "portable" or, where isa'):
        scan(kernel="sse9")
    if pruned.native_scan.isa() != "avx512":
        with pytest.raises(ValueError, match="kernel must be"):
            scan(kernel="avx512")
    with pytest.raises(TypeError):
        pruned.native_scan.scan(1, 2, 3)


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
