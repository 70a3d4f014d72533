"""The numerical core against independent computations: k-means on separable data, PCA against
scikit-learn, the m-nearest-word score against a brute force, the coverage-averaged map against
a per-pixel loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vad_feature_dictionary.dictionary import (
    coverage,
    coverage_average,
    fit_pca,
    kmeans,
    nearest_rows,
    patch_starts,
    word_score,
)


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three tight, far-apart Gaussian blobs in 5-d of 40, 25 and 15 points: rows, truth, means."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0] * 5, [10.0] * 5, [-10.0, 10.0, -10.0, 10.0, -10.0]])
    sizes = (40, 25, 15)
    rows = torch.cat([means[i] + 0.3 * torch.randn(size, 5, generator=generator) for i, size in enumerate(sizes)])
    truth = torch.cat([torch.full((size,), i) for i, size in enumerate(sizes)])
    order = torch.randperm(len(rows), generator=generator)
    return rows[order], truth[order], means


def test_kmeans_recovers_separable_clusters_and_is_seeded():
    rows, truth, means = blobs()
    centres, labels, inertia = kmeans(rows, 3, torch.Generator().manual_seed(1), restarts=3)
    # the same partition up to a renaming of the clusters
    pairs = {(int(t), int(label)) for t, label in zip(truth, labels)}
    assert len(pairs) == 3 and len({label for _, label in pairs}) == 3
    for cluster, label in pairs:
        members = rows[truth == cluster]
        torch.testing.assert_close(centres[label], members.mean(0))  # Lloyd's fixed point: the members' mean
        assert float((centres[label] - means[cluster]).norm()) < 0.3
    assert inertia == pytest.approx(float(((rows - centres[labels]) ** 2).sum()), rel=1e-5)
    again, _, _ = kmeans(rows, 3, torch.Generator().manual_seed(1), restarts=3)
    assert torch.equal(again, centres)


def test_kmeans_with_more_centres_than_distinct_points_relocates_empty_clusters():
    rows = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    centres, labels, inertia = kmeans(rows, 3, torch.Generator().manual_seed(0), restarts=1)
    assert torch.isfinite(centres).all() and inertia == 0.0
    assert {tuple(c) for c in centres.tolist()} <= {(0.0, 0.0), (1.0, 1.0)}
    assert torch.equal(rows[nearest_rows(rows, centres)], centres)  # each word is a training row


@pytest.mark.parametrize("variance", [0.5, 0.95, 1.0])
def test_pca_keeps_the_axes_scikit_learn_keeps(variance):
    PCA = pytest.importorskip("sklearn.decomposition").PCA

    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(200, 8, generator=generator) @ torch.randn(8, 8, generator=generator) + 3.0
    mean, components, explained = fit_pca(rows, variance)
    reference = PCA(n_components=variance if variance < 1 else None).fit(rows.double().numpy())
    assert components.shape == (8, reference.n_components_)
    assert explained == pytest.approx(reference.explained_variance_ratio_.sum(), abs=1e-6)
    ours = ((rows - mean) @ components).double().numpy()
    theirs = reference.transform(rows.double().numpy())
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), rtol=1e-4, atol=1e-4)  # axes agree up to sign


@pytest.mark.parametrize("neighbors", [1, 3])
def test_word_score_is_the_mean_distance_to_the_m_nearest_words(neighbors):
    generator = torch.Generator().manual_seed(3)
    descriptors, words = torch.randn(2, 3, 4, generator=generator), torch.randn(6, 4, generator=generator)
    scores = word_score(descriptors, words, neighbors)
    expected = np.zeros((2, 3))
    for index in np.ndindex(2, 3):
        distances = sorted(float(np.linalg.norm(descriptors[index].numpy() - word)) for word in words.numpy())
        expected[index] = np.mean(distances[:neighbors])
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert float(word_score(words[2:3], words, 1)) == pytest.approx(0.0, abs=1e-3)  # a word is its own nearest


def test_patch_starts_reach_the_border():
    assert patch_starts(11, 4, 3) == [0, 3, 6, 7]  # the last window ends at the border
    assert patch_starts(10, 4, 3) == [0, 3, 6]  # already there
    assert patch_starts(4, 4, 8) == [0]


def test_coverage_average_is_the_mean_over_the_covering_patches():
    height, width, patch = 11, 9, 4
    tops, lefts = patch_starts(height, patch, 3), patch_starts(width, patch, 2)
    scores = torch.randn(2, len(tops), len(lefts), generator=torch.Generator().manual_seed(4))
    maps = coverage_average(scores, coverage(height, tops, patch), coverage(width, lefts, patch))
    expected = np.zeros((2, height, width))
    for b, y, x in np.ndindex(2, height, width):
        covering = [scores[b, i, j].item() for i, top in enumerate(tops) for j, left in enumerate(lefts) if top <= y < top + patch and left <= x < left + patch]
        expected[b, y, x] = np.mean(covering)
    np.testing.assert_allclose(maps.numpy(), expected, rtol=1e-5, atol=1e-6)
