"""Shared numerical helpers of the contract: preprocessing, post-processing, results table."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndimage
import torch

from vad.contracts import Preprocessing
from vad.postprocess import bilinear_matrix, blur_matrix, postprocess_maps, upsample, upsample_and_blur
from vad.preprocess import to_batch
from vad.results import table_with_mean, to_markdown


@pytest.mark.parametrize("shape", [(1, 224, 224), (2, 20, 7), (1, 3, 40)])
def test_gaussian_blur_equals_scipy_including_edges(shape):
    maps = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = upsample_and_blur(maps, maps.shape[-2:], 4.0).numpy()
    reference = np.stack([ndimage.gaussian_filter(m, 4.0) for m in maps.numpy()])
    np.testing.assert_allclose(ours, reference, atol=1e-12)


def test_blur_with_zero_sigma_is_identity():
    maps = torch.rand(2, 5, 5)
    assert np.array_equal(blur_matrix(5, 0.0), np.eye(5))
    torch.testing.assert_close(upsample_and_blur(maps, (5, 5), 0.0), maps, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("size_in", "size_out"), [(28, 224), (7, 20), (5, 5), (1, 4), (14, 28), (3, 1000)])
def test_bilinear_matrix_is_the_one_axis_factor_of_upsample(size_in, size_out):
    maps = torch.rand(2, size_in, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.matmul(torch.from_numpy(bilinear_matrix(size_in, size_out)), maps)
    torch.testing.assert_close(ours, upsample(maps, (size_out, 3)), rtol=0, atol=1e-12)


def test_upsample_and_blur_equals_upsample_then_scipy_blur():
    grid = torch.rand(3, 28, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    upsampled = upsample(grid, (224, 160)).numpy()
    reference = np.stack([ndimage.gaussian_filter(m, 4.0) for m in upsampled])
    np.testing.assert_allclose(upsample_and_blur(grid, (224, 160), 4.0).numpy(), reference, atol=1e-12)
    single = upsample_and_blur(grid.float(), (224, 160), 4.0)  # float32, the pipeline's dtype
    assert single.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), reference, atol=1e-6)


def test_postprocess_returns_maps_at_each_original_size():
    grid = torch.rand(2, 8, 8)
    maps = postprocess_maps(grid, Preprocessing(size=(64, 64)), [(100, 80), (37, 300)], sigma=4.0)
    assert [m.shape for m in maps] == [(100, 80), (37, 300)]
    assert all(m.dtype == np.float32 for m in maps)


def test_postprocess_order_is_upsample_blur_then_resize():
    grid = torch.zeros(1, 4, 4)
    grid[0, 1, 1] = 1.0
    prep = Preprocessing(size=(32, 32))
    smoothed = torch.from_numpy(ndimage.gaussian_filter(upsample(grid, (32, 32))[0].numpy(), 2.0))
    expected = upsample(smoothed[None], (64, 64))[0].numpy()
    np.testing.assert_allclose(postprocess_maps(grid, prep, [(64, 64)], sigma=2.0)[0], expected, atol=1e-6)


def test_postprocess_with_crop_places_map_in_the_cropped_window():
    prep = Preprocessing(size=(32, 32), resize=(40, 40), crop=True)
    grid = torch.ones(1, 4, 4)
    (full,) = postprocess_maps(grid, prep, [(40, 40)], sigma=0.0)
    assert full[20, 20] == pytest.approx(1.0)
    assert full[0, 0] == pytest.approx(1.0)  # border gets the map minimum (here the constant)
    grid[0, 0, 0] = 0.0
    (full,) = postprocess_maps(grid, prep, [(40, 40)], sigma=0.0)
    assert full[0, 0] == pytest.approx(0.0)


def test_to_batch_resizes_and_normalises():
    white = np.full((50, 70, 3), 255, np.uint8)
    prep = Preprocessing(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch = to_batch([white, white[:10]], prep)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch, torch.full_like(batch, 2.0))


def test_results_table_mean_is_computed_over_present_values():
    columns, rows = table_with_mean({"a": {"auroc": 0.5, "pro": None}, "b": {"auroc": 1.0, "pro": 0.8}})
    assert columns == ["auroc", "pro"]
    assert rows["mean"] == {"auroc": 0.75, "pro": 0.8}
    assert "| **mean** | 0.7500 | 0.8000 |" in to_markdown(columns, rows)
