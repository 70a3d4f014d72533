"""DRAEM's numerical core: sub-networks, losses, image score."""

import numpy as np
import torch
import torch.nn.functional as F

from vad_draem.losses import anomaly_score, focal_loss, ssim_loss, ssim_map
from vad_draem.network import DiscriminativeSubNetwork, ReconstructiveSubNetwork


def test_official_widths_give_the_official_parameter_counts():
    # Official model_unet.py: ReconstructiveSubNetwork(base_width=128) and
    # DiscriminativeSubNetwork(base_channels=64) have 69,048,579 and 28,374,146 parameters.
    with torch.device("meta"):
        reconstructive = ReconstructiveSubNetwork(3, 3, base_width=128)
        discriminative = DiscriminativeSubNetwork(6, 2, base_width=64)
    assert sum(p.numel() for p in reconstructive.parameters()) == 69_048_579
    assert sum(p.numel() for p in discriminative.parameters()) == 28_374_146


def test_sub_network_shapes():
    x = torch.rand(2, 3, 64, 96)
    reconstruction = ReconstructiveSubNetwork(base_width=4)(x)
    assert reconstruction.shape == x.shape
    discriminative = DiscriminativeSubNetwork(base_width=4)
    features = discriminative.encode(torch.cat((reconstruction, x), 1))
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 32, 32]
    assert [f.shape[-1] for f in features] == [96, 48, 24, 12, 6, 3]
    assert discriminative.decode(features).shape == (2, 2, 64, 96)


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
