"""The torch PCA against scikit-learn, and its bounded-memory fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SklearnPCA

from vad.errors import VadError
from vad_ensembles.pca import PCA, PCAFitter, grid_to_patches


def correlated_grids(seed: int = 0, batches: int = 5, channels: int = 12) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=generator) * torch.linspace(3, 0.1, channels)
    offset = 50 + torch.randn(channels, generator=generator)  # large mean: tests the shifted sums
    return [
        (torch.randn(3, 6, 5, channels, generator=generator) @ mixing.T + offset).permute(0, 3, 1, 2).contiguous()
        for _ in range(batches)
    ]


def fit(grids, n_components, max_fit_patches=None, seed=0) -> PCA:
    fitter = PCAFitter(max_fit_patches, seed)
    for grid in grids:
        fitter.update(grid)
    return fitter.fit(n_components)


def test_pca_matches_sklearn_components_variance_and_projection():
    grids = correlated_grids()
    rows = torch.cat([grid_to_patches(g) for g in grids]).double().numpy()
    reference = SklearnPCA(n_components=5, svd_solver="full").fit(rows)
    ours = fit(grids, 5)
    np.testing.assert_allclose(ours.mean.numpy(), reference.mean_, rtol=1e-5)
    np.testing.assert_allclose(ours.explained_variance.numpy(), reference.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_ratio.numpy(), reference.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(ours.components.numpy(), reference.components_, atol=1e-4)  # same sign convention
    projected = ours.transform(grids[0])  # [B, K, h, w]
    expected = reference.transform(grid_to_patches(grids[0]).double().numpy())
    np.testing.assert_allclose(grid_to_patches(projected).numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_variance_fraction_keeps_the_same_number_of_components_as_sklearn(fraction):
    grids = correlated_grids(seed=3)
    rows = torch.cat([grid_to_patches(g) for g in grids]).double().numpy()
    reference = SklearnPCA(n_components=fraction, svd_solver="full").fit(rows)
    assert fit(grids, fraction).n_components == reference.n_components_


def test_sample_larger_than_data_equals_exact_fit_and_small_sample_is_bounded_and_seeded():
    grids = correlated_grids()
    exact = fit(grids, 4)
    sampled_all = fit(grids, 4, max_fit_patches=10_000)
    np.testing.assert_allclose(sampled_all.components.numpy(), exact.components.numpy(), atol=1e-4)
    fitter = PCAFitter(40, seed=7)
    for grid in grids:
        fitter.update(grid)
    assert fitter.count == 40  # memory bounded by max_fit_patches
    first, second = fitter.fit(4), fit(grids, 4, max_fit_patches=40, seed=7)
    torch.testing.assert_close(first.components, second.components)
    other_seed = fit(grids, 4, max_fit_patches=40, seed=8)
    assert not torch.allclose(first.mean, other_seed.mean)


def test_state_tensors_round_trip():
    pca = fit(correlated_grids(), 3)
    again = PCA.from_tensors(pca.tensors("pca"), "pca")
    grid = correlated_grids(seed=9, batches=1)[0]
    torch.testing.assert_close(again.transform(grid), pca.transform(grid))
    with pytest.raises(VadError, match="lacks tensor"):
        PCA.from_tensors({}, "pca")


def test_too_few_patches_and_wrong_widths_are_clear_errors():
    # (n_components itself is a declared option of the ensembles: see test_feature_ensembles.py)
    tiny = torch.randn(1, 12, 1, 3)
    with pytest.raises(VadError, match="only 3 training patches"):
        fit([tiny], 5)
    with pytest.raises(VadError, match="at least 2"):
        fit([torch.randn(1, 12, 1, 1)], 1)
    with pytest.raises(VadError, match="fitted on 12 channels"):
        fit(correlated_grids(), 3).transform(torch.randn(1, 5, 2, 2))
