"""The shared reconstruction pieces: SSIM, focal loss, mean-filtered score, patch tiling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad.errors import VadError
from vad_reconstruction.losses import anomaly_score, focal_loss, ssim_loss, ssim_map
from vad_reconstruction.patches import patch_starts, reconstruct_by_patches


def test_ssim_matches_scikit_image_inside_the_border():
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(0)
    first = torch.rand(1, 1, 40, 40, generator=generator, dtype=torch.float64)
    second = (first + 0.2 * torch.rand(1, 1, 40, 40, generator=generator, dtype=torch.float64)).clamp(0, 1)
    ours = ssim_map(first, second).squeeze().numpy()
    _, reference = structural_similarity(
        first.squeeze().numpy(), second.squeeze().numpy(), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, full=True,
    )
    np.testing.assert_allclose(ours[5:-5, 5:-5], reference[5:-5, 5:-5], atol=1e-6)
    assert ssim_loss(first, first).abs() < 1e-6


def test_ssim_constants_replace_the_standard_ones():
    generator = torch.Generator().manual_seed(1)
    first = torch.rand(1, 1, 24, 24, generator=generator, dtype=torch.float64)
    second = torch.rand(1, 1, 24, 24, generator=generator, dtype=torch.float64)
    standard = ssim_map(first, second)
    assert torch.allclose(ssim_map(first, second, constants=(1e-4, 9e-4)), standard)
    bare = ssim_map(first, second, constants=(0.01, 0.03))
    assert not torch.allclose(bare, standard)
    # larger constants pull SSIM of unrelated patches towards 1
    assert bare.mean() > standard.mean()


def test_focal_loss_is_the_official_formula():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(torch.randn(2, 2, 5, 7, generator=generator), dim=1)
    target = (torch.rand(2, 1, 5, 7, generator=generator) > 0.5).float()
    # Official FocalLoss(): one-hot clamped to [1e-5, 1 - 1e-5], p_t = sum + 1e-5, gamma 2, mean.
    p = probabilities.permute(0, 2, 3, 1).reshape(-1, 2)
    t = target.reshape(-1).long()
    one_hot = F.one_hot(t, 2).float().clamp(1e-5, 1 - 1e-5)
    p_t = (one_hot * p).sum(1) + 1e-5
    expected = (-(1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert torch.allclose(focal_loss(probabilities, target), expected)
    # gamma 0 and no smoothing: the negative log-likelihood
    nll = F.nll_loss(torch.log(probabilities), target.squeeze(1).long())
    assert torch.allclose(focal_loss(probabilities, target, gamma=0.0, smooth=0.0), nll)


def test_image_score_is_max_of_the_21x21_mean_filtered_map():
    maps = torch.zeros(2, 64, 64)
    maps[0, 30, 30] = 1.0
    maps[1] = 0.25
    scores = anomaly_score(maps)
    assert torch.allclose(scores, torch.tensor([1 / 441, 0.25]))


def test_patch_starts_cover_the_border():
    assert patch_starts(10, 4, 3) == [0, 3, 6]
    assert patch_starts(11, 4, 3) == [0, 3, 6, 7]
    assert patch_starts(4, 4, 64) == [0]
    with pytest.raises(VadError, match="do not fit"):
        patch_starts(3, 4, 1)
    with pytest.raises(VadError, match="stride"):
        patch_starts(8, 4, 0)


def test_patchwise_reconstruction_averages_overlaps():
    images = torch.rand(2, 3, 11, 13)
    identity = reconstruct_by_patches(images, lambda patches: patches, patch_size=4, stride=3, batch_size=5)
    assert torch.allclose(identity, images)
    # a reconstruction that returns each patch's mean: every pixel is the mean of the means of
    # the patches covering it, computed here by brute force
    means = reconstruct_by_patches(images, lambda p: p.mean((-2, -1), keepdim=True).expand_as(p), 4, 3)
    rows, columns = patch_starts(11, 4, 3), patch_starts(13, 4, 3)
    expected = torch.zeros_like(images)
    counts = torch.zeros(11, 13)
    for top in rows:
        for left in columns:
            patch = images[..., top : top + 4, left : left + 4]
            expected[..., top : top + 4, left : left + 4] += patch.mean((-2, -1), keepdim=True)
            counts[top : top + 4, left : left + 4] += 1
    assert torch.allclose(means, expected / counts)
    # outputs may have another channel count than the patches (e.g. one-channel maps)
    sums = reconstruct_by_patches(images, lambda p: p.sum(1, keepdim=True), 4, 3)
    assert sums.shape == (2, 1, 11, 13) and torch.allclose(sums, images.sum(1, keepdim=True))
