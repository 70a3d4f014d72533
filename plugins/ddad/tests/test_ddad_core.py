"""DDAD's numerical heart against the official formulas: schedule, loss, conditioned denoising, map, adaptation loss, UNet."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad_ddad.network import (
    CHANNEL_MULTS,
    AttentionBlock,
    UNetModel,
    combine_maps,
    conditioned_reconstruction,
    diffusion_loss,
    domain_adaptation_loss,
    feature_distance,
    gaussian_blur,
    noise_schedule,
    patchify,
    pixel_distance,
    trajectory,
)


@pytest.fixture(scope="module")
def scheduler():
    return noise_schedule(1000, 1e-4, 0.02)


def official_alpha(t: int) -> float:
    """``reconstruction.py: _compute_alpha``: cumprod of 1 - [0, betas] at t + 1 (betas: float64 linspace cast to float32)."""
    betas = torch.tensor(np.linspace(1e-4, 0.02, 1000, dtype=np.float64)).float()
    return float((1 - torch.cat([torch.zeros(1), betas])).cumprod(dim=0)[t + 1])


def tiny_unet(seed: int = 0) -> UNetModel:
    """A tiny UNet with every weight random (the zero-initialised layers too, so it predicts something)."""
    torch.manual_seed(seed)
    unet = UNetModel(16, 8, (1, 2), heads=2, attention_resolutions=(8,), groups=4)
    generator = torch.Generator().manual_seed(seed + 1)
    unet.load_state_dict({k: 0.2 * torch.randn(v.shape, generator=generator) for k, v in unet.state_dict().items()})
    return unet.eval()


def test_noise_schedule_is_the_official_linear_schedule(scheduler):
    for t in (0, 1, 25, 225, 250, 999):
        assert float(scheduler.alphas_cumprod[t]) == pytest.approx(official_alpha(t), rel=1e-6)
    assert float(scheduler.alphas_cumprod[0]) == pytest.approx(1 - 1e-4, rel=1e-7)
    assert float(scheduler.final_alpha_cumprod) == 1.0  # _compute_alpha(-1): the step after t = 0
    images, noise = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 700])
    alpha = torch.tensor([official_alpha(3), official_alpha(700)]).view(-1, 1, 1, 1)
    torch.testing.assert_close(scheduler.add_noise(images, noise, t), alpha.sqrt() * images + (1 - alpha).sqrt() * noise)
    assert trajectory(250, 25) == [225, 200, 175, 150, 125, 100, 75, 50, 25, 0]


def test_diffusion_loss_is_the_official_get_loss(scheduler):
    unet, images = tiny_unet(), torch.rand(3, 3, 16, 16) * 2 - 1
    t, noise = torch.tensor([0, 400, 999]), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    alpha = torch.tensor([official_alpha(int(i)) for i in t]).view(-1, 1, 1, 1)
    with torch.no_grad():
        predicted = unet(alpha.sqrt() * images + (1 - alpha).sqrt() * noise, t.float())
        expected = sum(float(((noise[b] - predicted[b]) ** 2).sum()) for b in range(3)) / 3  # sum over c, h, w; mean over the batch
        assert float(diffusion_loss(unet, scheduler, images, t, noise)) == pytest.approx(expected, rel=1e-5)


def test_conditioned_denoising_matches_the_official_update(scheduler):
    """``reconstruction.py``'s loop, written out step by step, with the same noises."""
    unet = tiny_unet()
    generator = torch.Generator().manual_seed(4)
    x, y = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1, torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    start, skip, w, eta = 100, 25, 2.0, 1.0
    noises = [torch.randn(2, 3, 16, 16, generator=generator) for _ in range(5)]
    with torch.no_grad():
        a = official_alpha(start)
        xt = math.sqrt(a) * x + math.sqrt(1 - a) * noises[0]
        for index, (i, j) in enumerate(zip([75, 50, 25, 0], [50, 25, 0, -1])):
            at, at_next = official_alpha(i), official_alpha(j)
            et = unet(xt, torch.full((2,), float(i)))
            yt = math.sqrt(at) * y + math.sqrt(1 - at) * et
            et_hat = et - math.sqrt(1 - at) * w * (yt - xt)
            x0_t = (xt - et_hat * math.sqrt(1 - at)) / math.sqrt(at)
            c1 = eta * math.sqrt((1 - at / at_next) * (1 - at_next) / (1 - at))
            c2 = math.sqrt(max(0.0, (1 - at_next) - c1**2))
            xt = math.sqrt(at_next) * x0_t + c1 * noises[index + 1] + c2 * et_hat
        expected = xt
        result = conditioned_reconstruction(unet, scheduler, x, y, w, start, skip, eta, noises)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(result, x, atol=1e-2)  # the tiny random UNet changed the image
    # one noise per image position broadcasts over the batch: the same as the noise repeated
    shared = [n[:1] for n in noises]
    with torch.no_grad():
        torch.testing.assert_close(
            conditioned_reconstruction(unet, scheduler, x, y, w, start, skip, eta, shared),
            conditioned_reconstruction(unet, scheduler, x, y, w, start, skip, eta, [n.expand_as(x) for n in shared]),
        )
    with pytest.raises(ValueError, match="noise tensors"):
        conditioned_reconstruction(unet, scheduler, x, y, w, start, skip, eta, noises[:4])
    with pytest.raises(ValueError, match="skip dividing"):
        conditioned_reconstruction(unet, scheduler, x, y, w, start, 30, eta, noises[:5])


def official_patchify(features):
    """``anomaly_map.py: patchify``: 3x3 unfold with zero padding, mean over each patch."""
    unfolded = torch.nn.Unfold(kernel_size=3, stride=1, padding=1)(features)
    unfolded = unfolded.reshape(*features.shape[:2], 3, 3, -1).permute(0, 4, 1, 2, 3).mean(dim=(3, 4))
    side = int(math.sqrt(unfolded.shape[1]))
    return unfolded.reshape(features.shape[0], side, side, -1).permute(0, 3, 1, 2)


def test_map_combination():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 6, 5, 5, generator=generator)
    torch.testing.assert_close(patchify(features), official_patchify(features))
    reconstructed = [torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 6, 2, 2, generator=generator)]
    original = [torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 6, 2, 2, generator=generator)]
    expected = sum(
        F.interpolate((1 - F.cosine_similarity(official_patchify(o), official_patchify(r)))[:, None], size=8, mode="bilinear", align_corners=True)
        for r, o in zip(reconstructed, original)
    )
    torch.testing.assert_close(feature_distance(reconstructed, original, (8, 8)), expected)
    same = feature_distance(original, original, (8, 8))
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-6, rtol=0)

    images, reconstruction = torch.zeros(1, 3, 1, 2), torch.tensor([[[[0.3, 0.0]], [[0.6, 0.0]], [[0.0, 0.3]]]])
    torch.testing.assert_close(pixel_distance(reconstruction, images), torch.tensor([[[[0.3, 0.1]]]]))
    # D_f + v (max D_f / max D_p) D_p, the maxima of each image
    pixel = torch.tensor([[[[0.5, 1.0]]], [[[2.0, 4.0]]]])
    feature = torch.tensor([[[[0.2, 0.1]]], [[[0.3, 0.6]]]])
    combined = combine_maps(pixel, feature, v=3.0)
    torch.testing.assert_close(combined, torch.tensor([[[0.2 + 3 * 0.2 / 1.0 * 0.5, 0.1 + 3 * 0.2]], [[0.3 + 3 * 0.6 / 4 * 2, 0.6 + 3 * 0.6]]]))
    torch.testing.assert_close(combine_maps(pixel[1:], feature[1:], v=3.0), combined[1:])  # independent of the batch
    perfect = combine_maps(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.25), v=1.0)
    torch.testing.assert_close(perfect, torch.full((1, 2, 2), 0.25))  # a perfect reconstruction adds nothing (no NaN)

    # the score's blur: kornia's gaussian_blur2d(kernel 33, sigma 4, border 'reflect') written out
    maps = torch.rand(2, 40, 36, generator=generator, dtype=torch.float64)
    taps = torch.arange(33, dtype=torch.float64) - 16
    kernel = torch.exp(-(taps**2) / 32)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps[:, None], (16, 16, 16, 16), mode="reflect")
    expected = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 33, 1)), kernel.view(1, 1, 1, 33))[:, 0]
    torch.testing.assert_close(gaussian_blur(maps, 4.0), expected)
    constant = torch.full((1, 5, 3), 2.0, dtype=torch.float64)  # maps narrower than the kernel reflect repeatedly
    torch.testing.assert_close(gaussian_blur(constant, 4.0), constant)


def test_domain_adaptation_loss():
    generator = torch.Generator().manual_seed(6)
    levels = [lambda: torch.randn(2, 3, 2, 2, generator=generator), lambda: torch.randn(2, 5, 1, 1, generator=generator)]
    a, b, c, d = ([make() for make in levels] for _ in range(4))

    def cos(u, v):
        u, v = u.flatten().tolist(), v.flatten().tolist()
        return sum(p * q for p, q in zip(u, v)) / math.sqrt(sum(p * p for p in u) * sum(q * q for q in v))

    expected = 0.0
    for j in range(2):  # per level, each image's flattened features, averaged over the images
        for first, second, weight in ((a, b, 1.0), (b, c, 0.1), (a, d, 0.1)):
            expected += weight * sum(1 - cos(first[j][i], second[j][i]) for i in range(2)) / 2
    assert float(domain_adaptation_loss(a, b, c, d, 0.1)) == pytest.approx(expected, rel=1e-5)
    assert float(domain_adaptation_loss(b, b, b, b, 0.1)) == pytest.approx(0.0, abs=1e-6)  # aligned features cost nothing


def test_unet_is_the_official_architecture():
    unet = UNetModel(256, 64, CHANNEL_MULTS[256], heads=4)
    assert sum(p.numel() for p in unet.parameters()) == 32_952_707  # the official unet.py's UNetModel(256, 64, n_heads=4, in_channels=3)
    attention = [(name, module.norm.num_channels) for name, module in unet.named_modules() if isinstance(module, AttentionBlock)]
    # sides 32, 16, 8 of a 256 px input (ds 8, 16, 32): down 2 + 2 + 2, middle 1, up 3 + 3 + 3
    assert [channels for _, channels in attention] == [128] * 2 + [256] * 4 + [256] + [256] * 6 + [128] * 3
    assert all(module.attention.heads == 4 for module in unet.modules() if isinstance(module, AttentionBlock))
    state = unet.state_dict()
    assert {"time_embedding.1.weight", "down.0.0.weight", "down.10.1.to_qkv.weight", "middle.1.proj_out.weight", "up.0.0.skip_connection.weight", "out.2.weight"} <= set(state)
    for name in ("out.2.weight", "middle.1.proj_out.weight", "down.1.0.out_layers.3.weight"):
        assert not state[name].any(), name  # zero-initialised as official
