"""Reverse Distillation's numerical core: OCBE and decoder against the official code, loss, map, smoothing."""

import hashlib
import math

import numpy as np
import pytest
import torch

from vad_reverse_distillation.network import (
    GENERIC_ARCHITECTURE,
    OFFICIAL_ARCHITECTURES,
    OneClassBottleneck,
    ReverseDecoder,
    anomaly_map,
    distillation_loss,
    gaussian_blur,
    image_scores,
)

RESNET_CHANNELS = {"resnet18": (64, 128, 256), "wide_resnet50_2": (256, 512, 1024)}


def fingerprint(module: torch.nn.Module) -> str:
    """The state dict's keys and shapes, in order."""
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in module.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("name", "bottleneck", "decoder"),
    [
        # From the official RD4AD code (resnet.py BN_layer without its unused conv4/bn4, and
        # de_resnet.py): parameter counts and the sha256 of "key:shape" lines of the state dicts.
        ("resnet18", (11_680_000, "0476dff043e27f6c"), (3_703_168, "db18f5a3b8fedbbb")),
        ("wide_resnet50_2", (58_885_120, "97b6c1af3533ae50"), (24_917_504, "4e05548493722eb5")),
    ],
)
def test_resnet_networks_are_the_official_ones(name, bottleneck, decoder):
    with torch.device("meta"):
        ocbe = OneClassBottleneck(RESNET_CHANNELS[name], OFFICIAL_ARCHITECTURES[name])
        student = ReverseDecoder(RESNET_CHANNELS[name], OFFICIAL_ARCHITECTURES[name])
    assert (sum(p.numel() for p in ocbe.parameters()), fingerprint(ocbe)) == bottleneck
    assert (sum(p.numel() for p in student.parameters()), fingerprint(student)) == decoder


@pytest.mark.parametrize(("channels", "architecture"), [((24, 40, 112), GENERIC_ARCHITECTURE), ((64, 128, 256), OFFICIAL_ARCHITECTURES["resnet18"]), ((16, 32, 64), OFFICIAL_ARCHITECTURES["resnet50"])])
def test_decoder_rebuilds_every_encoder_level_shape(channels, architecture):
    # levels at strides 4, 8, 16 of a 64 x 96 image
    levels = [torch.randn(2, c, 16 // 2**i, 24 // 2**i) for i, c in enumerate(channels)]
    ocbe, decoder = OneClassBottleneck(channels, architecture), ReverseDecoder(channels, architecture)
    embedding = ocbe(levels)
    assert embedding.shape == (2, 2 * channels[2], 2, 3) and ocbe.out_channels == 2 * channels[2]
    assert [tuple(d.shape) for d in decoder(embedding)] == [tuple(level.shape) for level in levels]


def test_deconvolutions_keep_torch_default_init_and_convolutions_get_kaiming():
    torch.manual_seed(0)
    decoder = ReverseDecoder((64, 128, 256), OFFICIAL_ARCHITECTURES["resnet18"])
    conv = decoder.layer1[0].conv2.weight  # 3x3, 256 -> 256: Kaiming normal, fan_out = 256 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    deconv = decoder.layer1[0].conv1.weight  # torch's default uniform bound 1/sqrt(fan_in)
    assert isinstance(decoder.layer1[0].conv1, torch.nn.ConvTranspose2d)
    assert deconv.abs().max().item() <= 1 / math.sqrt(deconv.shape[1] * 4) + 1e-6


def two_positions(student_second):
    """One image, one level of 2 channels x 1 x 2 positions: teacher (1, 0) and (0, 1)."""
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    student = torch.tensor([[1.0, student_second[0]], [0.0, student_second[1]]]).view(1, 2, 1, 2)
    return teacher, student


def test_flattened_loss_is_one_cosine_per_image_as_the_official_code():
    teacher, student = two_positions((2.0, 0.0))
    # flattened: [1, 0, 0, 1] . [1, 2, 0, 0] / (sqrt 2 * sqrt 5)
    expected = 1 - 1 / math.sqrt(10)
    assert distillation_loss([teacher], [student]).item() == pytest.approx(expected)
    # per position: cosines 1 and 0, mean distance 0.5
    assert distillation_loss([teacher], [student], mode="per-position").item() == pytest.approx(0.5)


def test_loss_sums_levels_and_averages_images():
    first_t, first_s = two_positions((2.0, 0.0))
    # same direction at every position, but not one flattened vector: [1, 0, 0, 1] vs [1, 0, 0, 3]
    second_t, second_s = two_positions((0.0, 3.0))
    teacher, student = torch.cat([first_t, second_t]), torch.cat([first_s, second_s])
    level2_t, level2_s = torch.ones(2, 3, 2, 2), -torch.ones(2, 3, 2, 2)  # opposite: distance 2
    loss = distillation_loss([teacher, level2_t], [student, level2_s])
    assert loss.item() == pytest.approx((1 - 1 / math.sqrt(10) + 1 - 4 / math.sqrt(20)) / 2 + 2)
    per_position = distillation_loss([teacher, level2_t], [student, level2_s], mode="per-position")
    assert per_position.item() == pytest.approx((0.5 + 0) / 2 + 2)
    assert distillation_loss([teacher], [teacher]).item() == pytest.approx(0, abs=1e-6)


def angled(angles: torch.Tensor):
    """Teacher (1, 0) everywhere; student at ``angles`` ``[h, w]``: distance 1 - cos(angle)."""
    teacher = torch.stack([torch.ones_like(angles), torch.zeros_like(angles)]).unsqueeze(0)
    student = torch.stack([torch.cos(angles), torch.sin(angles)]).unsqueeze(0)
    return teacher, student


def test_map_upsamples_each_level_with_aligned_corners_and_adds_or_multiplies():
    fine_t, fine_s = angled(torch.full((4, 4), math.pi / 3))  # distance 0.5 everywhere
    coarse_angles = torch.tensor([[0.0, math.pi / 2], [math.pi / 2, math.pi]])  # distances 0, 1, 1, 2
    coarse_t, coarse_s = angled(coarse_angles)
    added = anomaly_map([fine_t, coarse_t], [fine_s, coarse_s], (3, 3), "add")[0]
    # align_corners=True keeps the 2x2 corners and puts their mean at the centre
    assert added[0, 0].item() == pytest.approx(0.5 + 0) and added[2, 2].item() == pytest.approx(0.5 + 2)
    assert added[0, 2].item() == pytest.approx(0.5 + 1) and added[1, 1].item() == pytest.approx(0.5 + 1)
    assert added[0, 1].item() == pytest.approx(0.5 + 0.5)
    multiplied = anomaly_map([fine_t, coarse_t], [fine_s, coarse_s], (3, 3), "multiply")[0]
    torch.testing.assert_close(multiplied, 0.5 * (added - 0.5))


@pytest.mark.parametrize(("shape", "sigma"), [((2, 20, 37), 4.0), ((1, 64, 64), 1.5), ((1, 5, 7), 4.0)])
def test_smoothing_is_scipys_gaussian_filter(shape, sigma):
    from scipy.ndimage import gaussian_filter

    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = gaussian_blur(maps, sigma)
    for i in range(shape[0]):
        np.testing.assert_allclose(ours[i].numpy(), gaussian_filter(maps[i].numpy(), sigma=sigma), atol=1e-12)
    np.testing.assert_allclose(image_scores(maps, sigma).numpy(), [gaussian_filter(m.numpy(), sigma=sigma).max() for m in maps])
    assert torch.equal(gaussian_blur(maps, 0.0), maps)
