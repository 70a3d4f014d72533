"""CFA's numerical heart against hand computations: descriptor input, coordinates, distances, loss, score, bank."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad_cfa.network import (
    Descriptor, cfa_loss, coordinate_channels, initial_bank, mean_descriptor, patch_features, patch_scores, smoothed_maxima,
    squared_distances,
)


def test_levels_are_pooled_with_zero_padding_resized_and_concatenated():
    shallow, deep = torch.ones(1, 1, 4, 4), torch.full((1, 1, 2, 2), 2.0)
    features = patch_features([shallow, deep])
    assert features.shape == (1, 2, 4, 4)
    # 3 x 3 mean with the zero padding counted: corners see 4 of 9 cells, edges 6, the inside 9
    expected = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]]) / 9
    torch.testing.assert_close(features[0, 0], expected)
    # every cell of the 2 x 2 level sees 4 of its 9 cells: 2 * 4 / 9, then resized to 4 x 4
    torch.testing.assert_close(features[0, 1], torch.full((4, 4), 8 / 9))


def test_coordinates_are_row_then_column_from_minus_one_to_one():
    coords = coordinate_channels(torch.zeros(2, 5, 3, 4))
    assert coords.shape == (2, 2, 3, 4)
    torch.testing.assert_close(coords[1, 0], torch.tensor([[-1.0] * 4, [0.0] * 4, [1.0] * 4]))
    torch.testing.assert_close(coords[1, 1], torch.tensor([[-1.0, -1 / 3, 1 / 3, 1.0]] * 3))
    assert torch.equal(coordinate_channels(torch.zeros(1, 1, 1, 2))[0, 0], torch.tensor([[-1.0, -1.0]]))  # official: NaN


def test_the_descriptor_is_a_1x1_conv_over_features_and_coordinates():
    torch.manual_seed(0)
    descriptor = Descriptor(3, 2)
    levels = [torch.randn(2, 1, 4, 4), torch.randn(2, 2, 2, 2)]
    features = patch_features(levels)
    stacked = torch.cat([features, coordinate_channels(features)], dim=1)
    conv = descriptor.layer.conv
    assert conv.weight.shape == (2, 5, 1, 1)
    expected = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], stacked) + conv.bias[None, :, None, None]
    torch.testing.assert_close(descriptor(levels), expected)


def test_squared_distances_are_those_to_every_centroid_in_row_major_order():
    descriptors = torch.randn(2, 3, 2, 5, generator=torch.Generator().manual_seed(1))
    bank = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    distances = squared_distances(descriptors, bank)
    assert distances.shape == (2, 10, 7)
    patches = descriptors.flatten(2).transpose(1, 2)
    torch.testing.assert_close(distances, torch.cdist(patches, bank[None].expand(2, -1, -1)) ** 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(distances[1, 6], ((descriptors[1, :, 1, 1][None] - bank) ** 2).sum(1))  # row 1, column 1


# squared distances of two patches to five centroids, in no particular order
DISTANCES = torch.tensor([[[0.5, 2.0, 0.01, 0.3, 0.05], [5.0, 1.2, 3.0, 1.7, 1.6]]])


def test_the_loss_by_hand():
    radius = torch.tensor([1.0])
    # K = 2, J = 2, r^2 = 1, alpha = 0.1 (the 5th nearest never counts)
    # attraction max(0, d - 1) of the two nearest: patch 1 (0.01, 0.05) -> 0, 0; patch 2 (1.2, 1.6) -> 0.2, 0.6
    # repulsion max(0, 1 - d - 0.1) of the next two: patch 1 (0.3, 0.5) -> 0.6, 0.4; patch 2 (1.7, 3.0) -> 0, 0
    loss = cfa_loss(DISTANCES, radius, neighbours=2, hard_negatives=2, nu=0.5, margin=0.1)
    assert loss.item() == pytest.approx((0.8 / 4 + 1.0 / 4) / 0.5)
    # K = 1, J = 2: the hard negatives are the 2nd and 3rd nearest (the paper's c^j after the c^k)
    # attraction: 0 and 0.2 -> 0.1; repulsion: patch 1 (0.05, 0.3) -> 0.85, 0.6; patch 2 (1.6, 1.7) -> 0 -> 1.45 / 4
    loss = cfa_loss(DISTANCES, radius, neighbours=1, hard_negatives=2, nu=0.5, margin=0.1)
    assert loss.item() == pytest.approx((0.2 / 2 + 1.45 / 4) / 0.5)


def test_the_loss_is_the_official_one_for_k_equal_j():
    distances = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(3))
    r = torch.tensor([0.6])
    # utils/cfa.py _soft_boundary, with nu = 1e-3, alpha = 0.1, K = J = 3
    dist = distances.topk(6, largest=False).values
    score = dist[:, :, :3] - r**2
    att = (1 / 1e-3) * torch.mean(torch.max(torch.zeros_like(score), score))
    score = r**2 - dist[:, :, 3:]
    rep = (1 / 1e-3) * torch.mean(torch.max(torch.zeros_like(score), score - 0.1))
    torch.testing.assert_close(cfa_loss(distances, r, 3, 3, 1e-3, 0.1), att + rep)


def test_the_score_by_hand():
    squared = torch.tensor([[[4.0, 1.0, 9.0, 16.0], [-1e-7, 4.0, 1.0, 9.0]]])
    # Euclidean 2, 1, 3, 4: the nearest (1) weighted by its softmin share among the K nearest
    scores = patch_scores(squared, neighbours=2)
    assert scores[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert scores[0, 1].item() == 0.0  # a rounding-negative squared distance is 0, not NaN
    assert patch_scores(squared, neighbours=3)[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1) + math.exp(-2)))
    assert patch_scores(squared, neighbours=1)[0, 0].item() == pytest.approx(1.0)


def test_the_image_score_smoothing_is_scipys_filter_of_the_bilinear_upsampling():
    from scipy.ndimage import gaussian_filter

    maps = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    upsampled = F.interpolate(maps[:, None], size=(7, 12), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(smoothed_maxima(maps, (7, 12), 4.0).numpy(), [gaussian_filter(m, sigma=4).max() for m in upsampled], atol=1e-12)  # radius 16: mirrored more than once
    np.testing.assert_allclose(smoothed_maxima(maps, (7, 12), 0.0).numpy(), upsampled.reshape(2, -1).max(1), atol=1e-12)


def test_the_bank_is_the_mean_descriptor_map_one_centroid_per_position():
    torch.manual_seed(0)
    descriptor = Descriptor(3, 2)
    batches = [[torch.randn(3, 1, 2, 3), torch.randn(3, 2, 1, 2)], [torch.randn(1, 1, 2, 3), torch.randn(1, 2, 1, 2)]]
    mean = mean_descriptor(descriptor, batches)
    with torch.no_grad():
        every = torch.cat([descriptor(levels) for levels in batches])
    torch.testing.assert_close(mean, every.mean(0))  # over the 4 images, not the mean of the 2 batch means
    bank = initial_bank(mean, gamma_c=1, seed=0)
    assert bank.shape == (6, 2)
    torch.testing.assert_close(bank[4], mean[:, 1, 1])  # row-major: position (1, 1) is the 5th
    with pytest.raises(ValueError):
        mean_descriptor(descriptor, [])


def test_gamma_c_clusters_the_positions_with_k_means():
    # four positions in two tight pairs: gamma_c = 2 keeps 4 // 2 = 2 centroids, the pairs' means
    mean = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.2, 10.0, 10.2]]).reshape(2, 2, 2)
    bank = initial_bank(mean, gamma_c=2, seed=0)
    assert bank.shape == (2, 2)
    torch.testing.assert_close(bank[bank[:, 0].argsort()], torch.tensor([[0.0, 0.1], [10.0, 10.1]]))
