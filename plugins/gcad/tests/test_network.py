"""GCAD's networks and formulas against the thesis and hand computations."""

import pytest
import torch

from vad_gcad.network import (
    ENCODER_WIDTHS,
    DistillationDecoder,
    GcadModel,
    GlobalEncoderDecoder,
    UNet,
    augment,
    fold_normalisation,
    gcad_loss,
    map_statistics,
    regression_loss,
    skip_weights,
    squared_distance_map,
)
from vad_uninformed_students.teacher import PatchNetwork, descriptor_statistics


def test_unet_is_the_thesis_regressor():
    network = UNet(3, 128, depth=5, wf=6)
    assert [block.block[0].out_channels for block in network.down_path] == [64, 128, 256, 512, 1024]  # latent 16 x 16 x 1024 at 256 px
    assert [block.up.out_channels for block in network.up_path] == [512, 256, 128, 64]
    assert all(block.up.kernel_size == (2, 2) and block.up.stride == (2, 2) for block in network.up_path)  # 'upconv'
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    assert sum(p.numel() for p in network.parameters()) == 31_040_000
    small = UNet(3, 10, depth=3, wf=3)
    assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10, 32, 32)  # padding: output size = input size


def test_global_encoder_decoder_shapes_and_bottleneck():
    network = GlobalEncoderDecoder(64, bottleneck=32, out_channels=10)
    images = torch.rand(2, 3, 64, 64)
    latent, levels = network.encode(images)
    assert latent.shape == (2, 32, 1, 1)
    assert [tuple(level.shape[1:]) for level in levels] == [(32, 32, 32), (32, 16, 16), (64, 8, 8), (64, 4, 4), (64, 2, 2)]
    assert [conv.kernel_size for conv in network.encoder] == [(4, 4)] * 5 and all(conv.stride == (2, 2) for conv in network.encoder)
    assert network.to_latent.kernel_size == (2, 2) and GlobalEncoderDecoder(256).to_latent.kernel_size == (8, 8)
    assert [(s.in_channels, s.out_channels, s.kernel_size) for s in network.skips] == [(w, w, (1, 1)) for w in ENCODER_WIDTHS]
    assert network(images).shape == (2, 10, 64, 64)
    assert network.skip_weights.tolist() == [1.0] * 5


def test_without_skips_only_the_bottleneck_reaches_the_decoder():
    torch.manual_seed(0)
    network = GlobalEncoderDecoder(64)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        with_skips = network(images)
        network.set_skip_weights([0.0] * 5)
        without = network(images)
        for skip in network.skips:
            skip.weight.normal_()
        assert torch.equal(network(images), without)  # the skip paths no longer matter
        network.set_skip_weights([1.0] * 5)
        assert not torch.allclose(network(images), with_skips)  # ... and they did with weight 1


def test_each_skip_is_added_to_its_upconv_with_its_weight():
    torch.manual_seed(0)
    network = GlobalEncoderDecoder(64)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        network.set_skip_weights([0.0] * 5)
        base = network(images)
        for level in range(5):
            weights = [0.0] * 5
            weights[level] = 1.0
            network.set_skip_weights(weights)
            assert not torch.allclose(network(images), base), level


def test_skip_weight_schedule_upper_levels_first():
    assert skip_weights(0, 100) == [1.0] * 5
    assert skip_weights(10, 100) == pytest.approx([0.5, 1, 1, 1, 1])  # u (S/2) fades first
    assert skip_weights(20, 100) == pytest.approx([0, 1, 1, 1, 1])
    assert skip_weights(50, 100) == pytest.approx([0, 0, 0.5, 1, 1])
    assert skip_weights(90, 100) == pytest.approx([0, 0, 0, 0, 0.5])
    assert skip_weights(100, 100) == skip_weights(400, 100) == [0.0] * 5
    assert skip_weights(0, 0) == [0.0] * 5  # no decay: no skips at all
    for epoch in range(100):  # linear, never increasing, an upper level never above a lower one
        now, later = skip_weights(epoch, 100), skip_weights(epoch + 1, 100)
        assert all(b <= a for a, b in zip(now, later)) and now == sorted(now)
        assert sum(now) - sum(later) == pytest.approx(5 / 100)


def test_the_distillation_decoder_is_three_1x1_convolutions():
    decoder = DistillationDecoder(10, 128)
    convs = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(10, 128, (1, 1)), (128, 128, (1, 1)), (128, 128, (1, 1))]
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in decoder.modules()) == 2
    assert decoder(torch.rand(2, 10, 5, 7)).shape == (2, 128, 5, 7)


def test_losses_are_normalised_by_feature_depth():
    target = torch.zeros(2, 3, 1, 2)
    prediction = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]], [[1.0, 0.0]]], [[[0.0, 0.0]], [[2.0, 0.0]], [[0.0, 0.0]]]])
    # per pixel squared norms: image 1: 1+0+1 = 2 and 4+1+0 = 5; image 2: 4 and 0 -> mean 11 / 4
    assert float(regression_loss(target, prediction)) == pytest.approx(11 / 4)
    assert squared_distance_map(target, prediction).tolist() == [[[2.0, 5.0]], [[4.0, 0.0]]]
    kd, local, glo = torch.tensor(256.0), torch.tensor(64.0), torch.tensor(5.0)
    assert float(gcad_loss(kd, local, glo, 128, 10)) == pytest.approx(256 / 128 + 5 / 10 + 64 / 128)
    assert float(gcad_loss(kd, local, None, 128, 10)) == pytest.approx(256 / 128 + 64 / 128)  # before R_glo trains


def test_teacher_normalisation_folds_into_the_last_layer():
    torch.manual_seed(0)
    teacher = PatchNetwork(17).eval()
    images = [torch.randn(2, 3, 24, 24) for _ in range(2)]
    mean, std = descriptor_statistics(teacher, images)
    with torch.no_grad():
        expected = [(teacher(b) - mean) / std for b in images]
    fold_normalisation(teacher, mean, std)
    with torch.no_grad():
        for batch, wanted in zip(images, expected):
            torch.testing.assert_close(teacher(batch), wanted, rtol=1e-4, atol=1e-4)
    folded_mean, folded_std = descriptor_statistics(teacher, images)
    assert folded_mean.abs().max() < 1e-4 and (folded_std - 1).abs().max() < 1e-4


def test_map_statistics_and_model_output():
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mean, std = map_statistics(values)
    assert float(mean) == pytest.approx(3.0) and float(std) == pytest.approx((7.0 / 2) ** 0.5)  # population std
    assert float(map_statistics(torch.ones(3, 3))[1]) == pytest.approx(1e-6)  # constant maps stay finite
    torch.manual_seed(0)
    model = GcadModel([17, 33], 32, bottleneck=4, global_channels=3, unet_depth=2, unet_width=2).eval()
    stats = {"p17": (1.0, 2.0, 3.0, 4.0), "p33": (0.5, 0.25, 2.0, 8.0)}
    for key, (lm, ls, gm, gs) in stats.items():
        branch = model.branches[key]
        branch.local_mean.fill_(lm), branch.local_std.fill_(ls), branch.global_mean.fill_(gm), branch.global_std.fill_(gs)
    images = torch.rand(2, 3, 32, 32)
    scores, maps = model(images)
    expected = []
    for key, (lm, ls, gm, gs) in stats.items():
        local, glo = model.branches[key].raw_maps(images)
        expected.append((local - lm) / ls + (glo - gm) / gs)
    torch.testing.assert_close(maps, (expected[0] + expected[1]) / 2)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    assert maps.shape == (2, 32, 32)


def test_augmentations():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    assert torch.equal(augment(images, generator, rotation=0, jitter=0), images)
    flipped = augment(images, torch.Generator().manual_seed(2), vertical_flip=True, horizontal_flip=True, rotation=0, jitter=0)
    for image, out in zip(images, flipped):
        assert any(torch.equal(out, candidate) for candidate in (image, image.flip(-1), image.flip(-2), image.flip(-1).flip(-2)))
    rotated = augment(images, torch.Generator().manual_seed(3), rotation=3, jitter=0)
    assert rotated.shape == images.shape and not torch.equal(rotated, images)
    assert (rotated[:, :, 4:12, 4:12] - images[:, :, 4:12, 4:12]).abs().mean() < 0.2  # a small rotation
    flat = torch.full((8, 3, 4, 4), 0.5)
    jittered = augment(flat, torch.Generator().manual_seed(4), rotation=0, jitter=0.2)
    assert jittered.min() >= 0.5 * 0.8 * 0.8 - 1e-6 and jittered.max() <= 0.5 * 1.2 * 1.2 + 1e-6
    again = augment(images, torch.Generator().manual_seed(5), True, True, 3, 0.2)
    assert torch.equal(again, augment(images, torch.Generator().manual_seed(5), True, True, 3, 0.2))  # all randomness from the generator
