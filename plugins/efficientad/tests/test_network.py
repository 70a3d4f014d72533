"""EfficientAD's networks and formulas against the official architecture and hand computations."""

import pytest
import torch

from vad_efficientad.network import (
    RECEPTIVE_FIELD,
    EfficientAdModel,
    autoencoder,
    channel_statistics,
    color_jitter,
    decoder_sizes,
    hard_feature_loss,
    map_quantiles,
    normalize_map,
    pdn,
    pdn_output_size,
)


def layout(network):
    """(kind, in, out, kernel, stride, padding) of each layer."""
    rows = []
    for m in network:
        if isinstance(m, torch.nn.Conv2d):
            rows.append(("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]))
        elif isinstance(m, torch.nn.AvgPool2d):
            rows.append(("avgpool", m.kernel_size, m.stride, m.padding))
        else:
            rows.append((type(m).__name__,))
    return rows


def test_pdn_small_is_the_official_architecture():
    assert layout(pdn("small")) == [
        ("conv", 3, 128, 4, 1, 0), ("ReLU",), ("avgpool", 2, 2, 0),
        ("conv", 128, 256, 4, 1, 0), ("ReLU",), ("avgpool", 2, 2, 0),
        ("conv", 256, 256, 3, 1, 0), ("ReLU",),
        ("conv", 256, 384, 4, 1, 0),
    ]
    assert [row[-1] for row in layout(pdn("small", padding=True)) if row[0] != "ReLU"] == [3, 1, 3, 1, 1, 0]
    assert sum(p.numel() for p in pdn("small").parameters()) == 2_694_144


def test_pdn_medium_is_the_official_architecture():
    assert layout(pdn("medium", 768)) == [
        ("conv", 3, 256, 4, 1, 0), ("ReLU",), ("avgpool", 2, 2, 0),
        ("conv", 256, 512, 4, 1, 0), ("ReLU",), ("avgpool", 2, 2, 0),
        ("conv", 512, 512, 1, 1, 0), ("ReLU",),
        ("conv", 512, 512, 3, 1, 0), ("ReLU",),
        ("conv", 512, 768, 4, 1, 0), ("ReLU",),
        ("conv", 768, 768, 1, 1, 0),
    ]
    assert [row[-1] for row in layout(pdn("medium", padding=True)) if row[0] != "ReLU"] == [3, 1, 3, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_output_shapes(size):
    network = pdn(size)
    for side in (64, 128):
        assert network(torch.rand(1, 3, side, side)).shape == (1, 384, side // 4 - 8, side // 4 - 8) == (1, 384, pdn_output_size(side), pdn_output_size(side))
    assert pdn_output_size(256) == 56
    assert pdn(size, padding=True)(torch.rand(1, 3, 64, 64)).shape == (1, 384, 16, 16)  # distillation layout: image_size / 4
    assert pdn(size, 768)(torch.rand(2, 3, 64, 64)).shape == (2, 768, 8, 8)  # the student


@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_receptive_field_is_33_pixels(size):
    torch.manual_seed(0)
    network = pdn(size, 8)
    for m in network:  # positive weights: no cancellation hides a pixel's influence
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data.uniform_(0.01, 1.0)
            m.bias.data.fill_(0.1)
    image = torch.rand(1, 3, 80, 80, requires_grad=True)
    out = network(image)
    out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum().backward()
    touched = image.grad[0].abs().sum(0) > 0
    rows, cols = touched.any(1).nonzero(), touched.any(0).nonzero()
    assert int(rows.max() - rows.min() + 1) == int(cols.max() - cols.min() + 1) == RECEPTIVE_FIELD


def test_autoencoder_is_the_official_one_at_256_px():
    network = autoencoder(256)
    convs = [row for row in layout(network) if row[0] == "conv"]
    assert convs[:6] == [("conv", 3, 32, 4, 2, 1), ("conv", 32, 32, 4, 2, 1), ("conv", 32, 64, 4, 2, 1), ("conv", 64, 64, 4, 2, 1), ("conv", 64, 64, 4, 2, 1), ("conv", 64, 64, 8, 1, 0)]
    assert convs[6:12] == [("conv", 64, 64, 4, 1, 2)] * 6 and convs[12:] == [("conv", 64, 64, 3, 1, 1), ("conv", 64, 384, 3, 1, 1)]
    assert [m.size for m in network if isinstance(m, torch.nn.Upsample)] == [3, 8, 15, 32, 63, 127, 56] and decoder_sizes(256) == [3, 8, 15, 32, 63, 127]
    assert all(m.mode == "bilinear" for m in network if isinstance(m, torch.nn.Upsample))
    assert [m.p for m in network if isinstance(m, torch.nn.Dropout)] == [0.2] * 6
    encoder = network[:11]
    assert encoder(torch.rand(1, 3, 256, 256)).shape == (1, 64, 1, 1)  # the latent
    assert network.eval()(torch.rand(1, 3, 256, 256)).shape == (1, 384, 56, 56)
    assert autoencoder(64).eval()(torch.rand(2, 3, 64, 64)).shape == (2, 384, 8, 8)


def test_hard_feature_loss_against_a_hand_computation():
    teacher = torch.zeros(1, 1, 10, 100)
    student = torch.arange(1000, dtype=torch.float32).view(1, 1, 10, 100) / 1000  # d = (i / 1000)^2
    d = (torch.arange(1000, dtype=torch.float64) / 1000) ** 2
    # quantile 0.999 of 1000 sorted values: position 0.999 * 999 = 998.001, between d[998] and d[999]
    d_hard = d[998] + 0.001 * (d[999] - d[998])
    expected = d[d >= d_hard].mean()  # only d[999] is above
    assert torch.isclose(torch.tensor(float(expected)), torch.tensor(0.999**2))
    assert torch.isclose(hard_feature_loss(teacher, student), torch.tensor(float(expected)))
    flat = torch.full((1, 4, 10, 10), 2.0)
    assert torch.isclose(hard_feature_loss(flat, torch.zeros_like(flat)), torch.tensor(4.0))  # ties: all kept


def test_map_normalisation_against_a_hand_computation():
    maps = torch.arange(201, dtype=torch.float32).view(1, 3, 67)  # 0 .. 200
    q_a, q_b = map_quantiles(maps)
    assert float(q_a) == pytest.approx(180.0) and float(q_b) == pytest.approx(199.0)  # 0.9 * 200, 0.995 * 200
    assert torch.allclose(normalize_map(torch.tensor([180.0, 199.0, 218.0]), q_a, q_b), torch.tensor([0.0, 0.1, 0.2]))
    big = torch.arange((1 << 24) + 1, dtype=torch.float32).flip(0)  # above torch.quantile's limit: sorted order statistics
    q = map_quantiles(big)
    assert float(q[0]) == pytest.approx(0.9 * (1 << 24), rel=1e-7) and float(q[1]) == pytest.approx(0.995 * (1 << 24), rel=1e-7)


def test_combined_map_padding_and_score():
    model = EfficientAdModel("small", 64).eval()
    for name, value in (("q_st_start", 1.0), ("q_st_end", 2.0), ("q_ae_start", 0.0), ("q_ae_end", 4.0)):
        getattr(model, name).fill_(value)
    st, ae = torch.full((1, 8, 8), 3.0), torch.full((1, 8, 8), 2.0)
    combined = model.combine(st, ae)
    assert combined.shape == (1, 16, 16)
    assert torch.allclose(combined[0, 4:12, 4:12], torch.tensor(0.5 * 0.2 + 0.5 * 0.05))  # 0.1 (3-1)/(2-1), 0.1 (2-0)/4
    assert combined[0, :4].abs().sum() == 0 and combined[0, :, 12:].abs().sum() == 0
    scores, maps = model(torch.rand(2, 3, 64, 64))
    assert scores.shape == (2,) and maps.shape == (2, 16, 16)
    upsampled = torch.nn.functional.interpolate(maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(scores, upsampled.flatten(1).amax(1))


def test_teacher_statistics_are_the_official_two_passes():
    network = torch.nn.Conv2d(3, 2, 1)
    batches = [torch.rand(1, 3, 4, 4) for _ in range(3)]
    mean, std = channel_statistics(network, batches)
    outputs = torch.cat([network(b) for b in batches]).detach()
    assert torch.allclose(mean.flatten(), outputs.mean(dim=(0, 2, 3)), atol=1e-6)  # equal-sized images
    assert torch.allclose(std.flatten(), ((outputs - mean) ** 2).mean(dim=(0, 2, 3)).sqrt(), atol=1e-6)
    uneven = [torch.cat(batches[:2]), batches[2]]  # chunks of 2 and 1 images weigh per image, as official
    for got, want in zip(channel_statistics(network, uneven), (mean, std)):
        assert torch.allclose(got, want, atol=1e-6)


def test_color_jitter_is_one_of_three_changes_within_twenty_percent():
    image = torch.rand(1, 3, 8, 8) * 0.5 + 0.25
    seen = set()
    for seed in range(30):
        out = color_jitter(image, torch.Generator().manual_seed(seed))
        ratio = out / image
        if torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), atol=1e-5):
            seen.add("brightness")
            assert 0.8 <= float(ratio.flatten()[0]) <= 1.2
        else:
            seen.add("other")
        assert out.min() >= 0 and out.max() <= 1
    assert seen == {"brightness", "other"}


def test_teacher_is_frozen_in_the_model():
    model = EfficientAdModel("small", 64).train()
    assert not model.teacher.training and model.student.training and model.autoencoder.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
