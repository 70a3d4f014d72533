"""Tests of vad-patchcore: coreset, Eq. 7, the detector, saving and errors (search: test_knn.py, test_pruned.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad_patchcore.coreset import StreamingCoreset, approximate_greedy_coreset, project, random_projection
from vad_patchcore.detector import PATCHCORE_STATE_VERSION, PatchCore, coreset_size
from vad_patchcore.knn import NearestNeighbours
from vad_patchcore.scoring import reweighted_scores


def grids(count: int, seed: int, dim: int = 12, size: int = 6, batch: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, size, size, generator=generator) for _ in range(count)]


# ------------------------------------------------------------------ coreset


def brute_force_k_center(points: np.ndarray, first: int, count: int) -> list[int]:
    """Textbook greedy k-center: start from ``first``, repeatedly add the farthest point."""
    distances = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=2)
    chosen = [first]
    while len(chosen) < count:
        chosen.append(int(distances[:, chosen].min(1).argmax()))
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coreset_equals_brute_force_greedy_k_center(seed):
    points = torch.randn(300, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    start = 17
    # one starting point, no projection: the official initialisation is the distance to the
    # start, which is not itself in the coreset, so ours = reference[1:]
    ours = approximate_greedy_coreset(points, 30, projection_dim=None, start_indices=torch.tensor([start]))
    reference = brute_force_k_center(points.numpy(), start, 31)
    assert ours.tolist() == reference[1:]


def test_coreset_mean_start_initialisation_matches_official_formula():
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    starts = torch.tensor([4, 50, 120])
    ours = approximate_greedy_coreset(points, 10, projection_dim=None, start_indices=starts)
    # official loop, written out: mean plain distance to the starts, then min-updates
    current = torch.cdist(points, points[starts]).mean(1)
    expected = []
    for _ in range(10):
        index = int(current.argmax())
        expected.append(index)
        current = torch.minimum(current, torch.cdist(points, points[index : index + 1])[:, 0])
    assert ours.tolist() == expected


def test_random_projection_is_seeded_and_follows_linear_init():
    a = random_projection(64, 16, torch.Generator().manual_seed(5))
    b = random_projection(64, 16, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (64, 16)
    assert a.abs().max() <= 1 / math.sqrt(64)
    features = torch.randn(10, 8)
    assert project(features, 128, torch.Generator()) is features  # no projection up
    assert project(features, None, torch.Generator()) is features


def test_coreset_is_deterministic_for_a_seed():
    points = torch.randn(500, 40, generator=torch.Generator().manual_seed(0))
    first = approximate_greedy_coreset(points, 50, 16, 10, torch.Generator().manual_seed(9))
    second = approximate_greedy_coreset(points, 50, 16, 10, torch.Generator().manual_seed(9))
    assert torch.equal(first, second) and len(set(first.tolist())) == 50


# ------------------------------------------------------------------ options


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(VadError, match="knn_backend"):
        PatchCore(knn_backend="annoy")


# ------------------------------------------------------------------ Eq. 7


def test_reweighting_on_a_hand_made_case():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    embeddings = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])  # second patch is the most anomalous
    patch_scores = torch.tensor([[0.0, 5.0]])  # ||(3,4) - (0,0)|| = 5: nearest is bank[0]
    nearest = torch.tensor([[0, 0]])
    support = torch.tensor([[0, 1, 2]])  # N_3(m*): m* itself, then its two neighbours
    score = reweighted_scores(patch_scores, nearest, embeddings, bank, support)
    d = torch.tensor([5.0, math.sqrt(4 + 16), math.sqrt(9 + 9)])
    expected = (1 - math.exp(5.0) / float(d.exp().sum())) * 5.0
    assert score.item() == pytest.approx(expected, rel=1e-6)


def test_reweighting_in_the_detector_matches_the_formula():
    detector = PatchCore(coreset_ratio=1.0, reweight=True, reweight_neighbors=3, knn_backend="torch")
    detector.fit(grids(2, seed=0))
    test = grids(1, seed=5)[0]
    prediction = detector.predict(test)
    plain = PatchCore(coreset_ratio=1.0, knn_backend="torch")
    plain.fit(grids(2, seed=0))
    base = plain.predict(test).scores
    assert torch.all(prediction.scores < base) and torch.all(prediction.scores > 0)
    assert torch.equal(prediction.maps, plain.predict(test).maps)


# ------------------------------------------------------------------ detector


def test_fit_predict_shapes_and_coreset_size():
    detector = PatchCore(coreset_ratio=0.25, coreset_chunk_patches=0)
    detector.fit(grids(4, seed=0))
    assert detector.memory_bank.shape == (int(4 * 3 * 36 * 0.25), 12)
    prediction = detector.predict(grids(1, seed=1)[0])
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 6, 6)
    assert torch.allclose(prediction.scores, prediction.maps.flatten(1).amax(1))


def test_predict_maps_are_each_patch_s_own_nearest_distance():
    # predict searches the patches in tile order and puts the results back: each map cell must
    # be the distance of that very patch
    detector = PatchCore(coreset_ratio=0.5)
    detector.fit(grids(3, seed=0))
    test = grids(1, seed=5)[0]
    squared, _ = NearestNeighbours(detector.memory_bank, "torch").search(test.permute(0, 2, 3, 1).reshape(-1, 12), 1)
    assert torch.equal(detector.predict(test).maps, squared.sqrt().view(3, 6, 6))


def test_streaming_chunks_bound_the_bank_and_equal_single_selection_when_small():
    train = grids(5, seed=0)  # 5 * 108 = 540 patches
    chunked = PatchCore(coreset_ratio=0.1, coreset_chunk_patches=200)
    chunked.fit(train)
    assert chunked.memory_bank.shape[0] == coreset_size(540, 0.1, 200) == 20 + 20 + 14
    whole = PatchCore(coreset_ratio=0.1, coreset_chunk_patches=10_000)
    whole.fit(train)
    official = PatchCore(coreset_ratio=0.1, coreset_chunk_patches=0)
    official.fit(train)
    assert torch.equal(whole.memory_bank, official.memory_bank)


def labelled_rows(count: int, seed: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose first coordinate is their owner (so where a row went tells whose it is)."""
    rows = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    owners = torch.arange(count) // 10
    rows[:, 0] = owners.float() * 100
    return rows, owners


def greedy_indices(rows: torch.Tensor, count: int) -> torch.Tensor:
    return approximate_greedy_coreset(rows, count, projection_dim=None, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("oversample, pool", [(1.0, 0), (4.0, 0), (4.0, 150)])
def test_merge_and_reduce_keeps_the_official_size_owners_and_bounded_memory(oversample, pool):
    rows, owners = labelled_rows(1000, seed=0)
    stream = StreamingCoreset(0.1, 200, oversample, pool, greedy_indices)
    for start in range(0, 1000, 30):  # batches of 30 rows
        stream.add(rows[start : start + 30], owners[start : start + 30])
    bank, bank_owners = stream.finish()
    if oversample == 1.0:  # composable: each chunk keeps its own int(n * ratio)
        assert bank.shape[0] == 5 * 20
    else:  # merge and reduce: one shared budget, the official size
        assert bank.shape[0] == int(1000 * 0.1) == coreset_size(1000, 0.1, 200)
    assert torch.equal(bank[:, 0], bank_owners.float() * 100)  # each row kept its owner
    assert len({tuple(row.tolist()) for row in bank}) == bank.shape[0]  # rows of the stream, none twice
    pooled = pool or math.ceil(oversample * 0.1 * 1000)  # without a limit the pool holds every candidate
    assert stream.peak_held <= 200 + 30 + max(pooled, 200) + bank.shape[0]


def test_merge_and_reduce_spends_the_budget_where_the_rows_are_diverse():
    # chunk 1: 400 copies of 4 points; chunk 2: 400 distinct points. A composable coreset gives
    # each chunk 40 rows; the shared budget puts nearly all of them in the diverse chunk.
    generator = torch.Generator().manual_seed(1)
    repeated = torch.randn(4, 8, generator=generator).repeat(100, 1)
    diverse = torch.randn(400, 8, generator=generator)
    rows, owners = torch.cat([repeated, diverse]), torch.cat([torch.zeros(400), torch.ones(400)]).long()
    kept = {}
    for oversample in (1.0, 4.0):
        stream = StreamingCoreset(0.1, 400, oversample, 0, greedy_indices)
        stream.add(rows, owners)
        kept[oversample] = int((stream.finish()[1] == 1).sum())
    assert kept[1.0] == 40 and kept[4.0] >= 76


def test_leave_one_out_equals_a_bank_fitted_without_the_image():
    train = grids(3, seed=0)  # 9 images
    everything = PatchCore(coreset_ratio=1.0)
    everything.fit(train)
    images = torch.cat(train)
    for position in (0, 4, 8):
        without = PatchCore(coreset_ratio=1.0)
        without.fit([torch.cat([images[:position], images[position + 1 :]])])
        left_out = everything.predict_left_out(images[position : position + 1], torch.tensor([position]))
        expected = without.predict(images[position : position + 1])
        torch.testing.assert_close(left_out.maps, expected.maps)
        torch.testing.assert_close(left_out.scores, expected.scores)
    in_sample = everything.predict(images[:3])
    assert torch.allclose(in_sample.scores, torch.zeros(3), atol=1e-5)  # its own patches are in the bank
    assert (everything.predict_left_out(images[:3], torch.arange(3)).scores > 0.5).all()


def test_leave_one_out_with_reweighting_and_a_coreset_leaves_the_image_s_rows_out():
    train = grids(4, seed=0)
    detector = PatchCore(coreset_ratio=0.3, reweight=True, reweight_neighbors=4, num_neighbors=2)
    detector.fit(train)
    assert detector.bank_sources.shape == (detector.memory_bank.shape[0],)
    assert set(detector.bank_sources.tolist()) <= set(range(12))
    images = torch.cat(train)
    left_out = detector.predict_left_out(images, torch.arange(12))
    assert torch.isfinite(left_out.scores).all()
    assert (left_out.maps >= detector.predict(images).maps - 1e-5).all()


def test_bank_sources_are_saved_and_old_states_cannot_score_left_out():
    detector = PatchCore(coreset_ratio=0.5)
    detector.fit(grids(2, seed=0))
    state = detector.state()
    restored = PatchCore(coreset_ratio=0.5)
    restored.load_state(state)
    assert torch.equal(restored.bank_sources, detector.bank_sources)
    old = PatchCore(coreset_ratio=0.5)
    old.load_state(State(meta=state.meta, tensors={"memory_bank": state.tensors["memory_bank"]}))
    probe = grids(1, seed=0)[0]
    torch.testing.assert_close(old.predict(probe).scores, detector.predict(probe).scores)
    with pytest.raises(VadError, match="cannot score training images as left out; refit"):
        old.predict_left_out(probe, torch.arange(3))
    with pytest.raises(VadError, match="bank_sources"):
        PatchCore().load_state(State(meta=state.meta, tensors={**state.tensors, "bank_sources": torch.zeros(2, dtype=torch.int64)}))


def test_ratio_one_keeps_every_patch_and_training_patches_score_zero():
    train = grids(2, seed=0)
    detector = PatchCore(coreset_ratio=1.0)
    detector.fit(train)
    assert detector.memory_bank.shape[0] == 2 * 3 * 36
    assert torch.allclose(detector.predict(train[0]).scores, torch.zeros(3), atol=1e-5)


def test_squared_distance_and_k_neighbours():
    train, test = grids(2, seed=0), grids(1, seed=3)[0]
    euclid = PatchCore(coreset_ratio=1.0, knn_backend="torch")
    euclid.fit(train)
    squared = PatchCore(coreset_ratio=1.0, distance="squared", knn_backend="torch")
    squared.fit(train)
    assert torch.allclose(squared.predict(test).maps, euclid.predict(test).maps.square(), rtol=1e-5)
    three = PatchCore(coreset_ratio=1.0, num_neighbors=3, knn_backend="torch")
    three.fit(train)
    assert torch.all(three.predict(test).maps >= euclid.predict(test).maps - 1e-6)


def test_deterministic_for_a_seed_and_seed_matters():
    train, test = grids(4, seed=0), grids(1, seed=1)[0]
    runs = []
    for seed in (0, 0, 1):
        detector = PatchCore(coreset_ratio=0.1, seed=seed)
        detector.fit(train)
        runs.append((detector.memory_bank, detector.predict(test).scores))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_save_load_same_scores(tmp_path):
    from vad import artifacts

    train, test = grids(3, seed=0), grids(1, seed=1)[0]
    detector = PatchCore(coreset_ratio=0.2, reweight=True)
    detector.fit(train)
    state = detector.state()
    artifacts.atomic_write_json(tmp_path / "detector.json", {"meta": state.meta, "hparams": detector.hparams})
    artifacts.save_tensors(tmp_path / "detector.safetensors", state.tensors)
    document, tensors = json.loads((tmp_path / "detector.json").read_text()), artifacts.load_tensors(tmp_path / "detector.safetensors")
    restored = PatchCore(**document["hparams"])
    restored.load_state(State(document["meta"], tensors))
    assert restored.hparams == detector.hparams
    before, after = detector.predict(test), restored.predict(test)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


# ------------------------------------------------------------------ errors


def test_empty_training_set_is_a_clear_error():
    detector = PatchCore()
    with pytest.raises(VadError, match="empty training set"):
        detector.fit([])
    assert not detector.fitted  # nothing half-written


def test_grid_smaller_than_one_patch_is_a_clear_error():
    detector = PatchCore()
    with pytest.raises(VadError, match="receptive field"):
        detector.fit([torch.zeros(2, 8, 0, 3)])
    assert not detector.fitted


def test_feature_dim_change_is_a_clear_error():
    detector = PatchCore(coreset_ratio=1.0)
    detector.fit(grids(1, seed=0, dim=12))
    with pytest.raises(VadError, match="12-dim"):
        detector.predict(grids(1, seed=0, dim=10)[0])
    with pytest.raises(VadError, match="channels between batches"):
        PatchCore().fit([grids(1, 0, dim=12)[0], grids(1, 0, dim=10)[0]])


def test_predict_before_fit_and_bad_hparams():
    with pytest.raises(VadError, match="not fitted"):
        PatchCore().predict(grids(1, 0)[0])
    with pytest.raises(VadError, match="not fitted"):
        PatchCore().state()
    for bad in ({"coreset_ratio": 0}, {"coreset_ratio": 1.5}, {"num_neighbors": 0}, {"distance": "cosine"}, {"coreset_projection_dim": -1}):
        with pytest.raises(VadError):
            PatchCore(**bad)


def test_incompatible_state_version_is_a_clear_error():
    detector = PatchCore(coreset_ratio=1.0)
    detector.fit(grids(1, seed=0))
    state = detector.state()
    assert state.meta["patchcore_state_version"] == PATCHCORE_STATE_VERSION
    fresh = PatchCore()
    with pytest.raises(VadError, match="patchcore_state_version 99"):
        fresh.load_state(State({**state.meta, "patchcore_state_version": 99}, state.tensors))
    with pytest.raises(VadError, match="memory_bank"):
        fresh.load_state(State(state.meta, {}))
    assert not fresh.fitted


# ------------------------------------------------------------------ with vad's feature source


def test_with_patch_features_and_model_folder(tmp_path, tiny_dataset, vad_fakes, register_plugin):
    from vad.build import create_backbone
    from vad.features import PatchFeatures
    from vad.model import AnomalyModel, Member

    source = PatchFeatures(create_backbone("fake-backbone", vad_fakes))  # stride-8 + stride-16 stages, 3x3 aggregation
    model = AnomalyModel([Member("patchcore", PatchCore(coreset_ratio=0.1), source)], batch_size=4)
    model.fit(tiny_dataset.train, [])
    outputs = list(model.predict(tiny_dataset.test))
    for output in outputs:  # maps come back at each image's original size
        assert output.map.shape == output.sample.load_image().shape[:2]
    labels = np.array([o.sample.label for o in outputs])
    scores = np.array([o.score for o in outputs])
    pairs = scores[labels == 1][:, None] > scores[labels == 0][None, :]
    assert pairs.mean() >= 0.8  # image AUROC: bright squares are easy even for random convolutions
    bank = model.members[0].detector.memory_bank
    assert bank.shape == (int(8 * 8 * 8 * 0.1), source.out_channels)

    import vad_patchcore

    if "patchcore" in vad_fakes.entries("detectors"):  # installed: found through its entry point
        model.save(tmp_path / "model", vad_fakes)
        loaded = AnomalyModel.load(tmp_path / "model", registry=vad_fakes)
    else:
        with register_plugin(vad_patchcore, "vad-patchcore") as registry:
            model.save(tmp_path / "model", registry)
            loaded = AnomalyModel.load(tmp_path / "model", registry=registry)
    again = list(loaded.predict(tiny_dataset.test))
    assert [o.score for o in again] == [o.score for o in outputs]
    assert all(np.array_equal(a.map, b.map) for a, b in zip(again, outputs))


@pytest.mark.parametrize(
    "options",
    [{}, {"num_neighbors": 3, "distance": "squared"}, {"reweight": True, "reweight_neighbors": 4}],
)
def test_export_module_matches_predict(options):
    detector = PatchCore(coreset_ratio=0.5, knn_backend="torch", **options)
    assert detector.export_module() is None  # nothing to export before fit
    detector.fit(grids(4, seed=0))
    test = grids(1, seed=5)[0]
    expected = detector.predict(test)
    scores, maps = detector.export_module()(test)
    torch.testing.assert_close(scores, expected.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, expected.maps, rtol=1e-5, atol=1e-5)


def test_patches_outside_a_region_of_interest_stay_out_of_the_bank():
    features = torch.randn(3, 8, 4, 6, generator=torch.Generator().manual_seed(0))
    inspected = torch.zeros(32, 48, dtype=torch.bool)
    inspected[:, 24:] = True  # the right half of the input: grid columns 3-5
    detector = PatchCore(coreset_ratio=1.0)
    assert detector.exclude_from_training(inspected) is True
    detector.fit([features])
    kept = features[:, :, :, 3:].permute(0, 2, 3, 1).reshape(-1, 8)
    assert detector.memory_bank.shape[0] == kept.shape[0]
    distances = torch.cdist(detector.memory_bank, kept, compute_mode="donot_use_mm_for_euclid_dist").min(dim=0).values
    assert float(distances.max()) < 1e-5  # every row is an inside patch, every inside patch a row
    nowhere = PatchCore(coreset_ratio=1.0)
    nowhere.exclude_from_training(torch.zeros(32, 48, dtype=torch.bool))
    with pytest.raises(VadError, match="covers no cell"):
        nowhere.fit([features])
