"""The thesis' autoencoder network, its losses and maps, patchwise maps, the opening, the samples."""

import math

import numpy as np
import torch
from torch import nn

from vad_autoencoder.augment import draw_plan, render, warp
from vad_autoencoder.detector import Autoencoder, AutoencoderScorer
from vad_autoencoder.network import ConvAutoencoder, disk_offsets, l2_map, open_maps, to_gray
from vad_reconstruction.losses import ssim_map


def layer_outputs(model: ConvAutoencoder, side: int) -> list[tuple[int, int, int]]:
    """(side, side, channels) after each encoder layer and the latent, as the thesis' tables."""
    x, shapes = torch.zeros(1, model.channels, side, side), []
    for block in model.encoder:
        x = block(x)
        shapes.append((x.shape[2], x.shape[3], x.shape[1]))
    latent = model.bottleneck(x)
    return shapes + [(latent.shape[2], latent.shape[3], latent.shape[1])]


def test_the_network_is_table_3_1_with_one_more_layer_for_256_px():
    table_3_1 = [(64, 64, 32), (32, 32, 32), (32, 32, 32), (16, 16, 64), (16, 16, 64), (8, 8, 128), (8, 8, 64), (8, 8, 32), (1, 1, 100)]
    patch_network = ConvAutoencoder(128, 1, 100)
    assert layer_outputs(patch_network, 128) == table_3_1
    # the 256 px network of the MVTec AD benchmark: Table 9.2's layout (one 4x4 stride-2 layer first)
    table_9_2 = [(128, 128, 32), (64, 64, 32)] + table_3_1[1:-1] + [(1, 1, 128)]
    image_network = ConvAutoencoder(256, 3, 128)
    assert layer_outputs(image_network, 256) == table_9_2
    kernels = [(b[0].kernel_size[0], b[0].stride[0], b[0].padding[0]) for b in image_network.encoder]
    assert kernels == [(4, 2, 1)] * 3 + [(3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1), (3, 1, 1)]
    assert image_network.bottleneck.kernel_size == (8, 8) and image_network.bottleneck.padding == (0, 0)
    # LeakyReLU 0.2 after every layer but the encoder's and the decoder's output layers (linear)
    hidden = [b for b in list(image_network.encoder) + list(image_network.decoder) if isinstance(b, nn.Sequential)]
    assert len(hidden) == 9 + 9 and all(isinstance(b[-1], nn.LeakyReLU) and b[-1].negative_slope == 0.2 for b in hidden)
    assert type(image_network.bottleneck) is nn.Conv2d and type(image_network.decoder[-1]) is nn.ConvTranspose2d
    x = torch.rand(2, 3, 256, 256)
    assert image_network(x).shape == x.shape
    # Table 4.5: 1.20 M parameters for the L2- and the SSIM-Autoencoder (d = 128, 256 px)
    for loss in ("l2", "ssim"):
        network = Autoencoder(loss=loss).build({})["model"]
        assert round(sum(p.numel() for p in network.parameters()) / 1e6, 2) == 1.20


def test_the_loco_network_is_table_6_3():
    network = ConvAutoencoder(256, 3, 32, "loco")
    assert layer_outputs(network, 256) == [(128, 128, 32), (64, 64, 32), (32, 32, 64), (16, 16, 64), (8, 8, 64), (1, 1, 32)]
    hidden = [b for b in list(network.encoder) + list(network.decoder) if isinstance(b, nn.Sequential)]
    assert all(isinstance(b[1], nn.BatchNorm2d) and b[2].negative_slope == 0.05 for b in hidden)
    assert network(torch.rand(1, 3, 256, 256)).shape == (1, 3, 256, 256)


def test_losses_and_maps_are_the_thesis_formulas():
    generator = torch.Generator().manual_seed(0)
    images, reconstructions = torch.rand(2, 3, 32, 32, generator=generator), torch.rand(2, 3, 32, 32, generator=generator)

    class Fixed(nn.Module):
        def forward(self, x):
            return reconstructions

    # eq. 3.2: the squared error summed over pixels and channels, averaged over the batch
    l2 = Autoencoder(loss="l2").training_loss(Fixed(), images, generator)
    torch.testing.assert_close(l2, ((images - reconstructions) ** 2).sum() / 2)
    # eq. 3.3: per pixel, the squared norm over the channels
    torch.testing.assert_close(l2_map(images, reconstructions)[1, 4, 7], ((images[1, :, 4, 7] - reconstructions[1, :, 4, 7]) ** 2).sum())
    # SSIM: 1 - SSIM per pixel, summed like eq. 3.2; standard or printed constants
    ssim = Autoencoder(loss="ssim").training_loss(Fixed(), images, generator)
    torch.testing.assert_close(ssim, (1 - ssim_map(images, reconstructions)).mean(1).sum() / 2)
    printed = Autoencoder(loss="ssim", ssim_constants="printed", ssim_window=7).residual()
    torch.testing.assert_close(printed(images, reconstructions), 1 - ssim_map(images, reconstructions, 7, constants=(0.01, 0.03)).mean(1))
    # grayscale: BT.601 luma, the SSIM-AE's default
    assert Autoencoder(loss="ssim").channels == 1 and Autoencoder(loss="l2").channels == 3
    assert Autoencoder(loss="l2", grayscale=True).channels == 1 and Autoencoder(loss="ssim", grayscale=False).channels == 3
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    torch.testing.assert_close(to_gray(red), torch.full((1, 1, 2, 2), 0.299))


def scorer(reconstruction: torch.Tensor, loss: str, **options) -> AutoencoderScorer:
    """The detector's scorer around a 'network' that always returns ``reconstruction``."""

    class Fixed(nn.Module):
        def forward(self, x):
            return reconstruction[:, : x.shape[1]].expand_as(x)

    detector = Autoencoder(loss=loss, **options)
    return AutoencoderScorer(Fixed(), detector.residual(), **detector.scorer_options()).eval()


def test_ssim_finds_a_low_contrast_structural_defect_that_l2_ranks_below_a_brightness_offset():
    # Fig. 3.2 / 3.8: where the input has fine structure of low contrast and the reconstruction
    # is flat, the squared error is tiny; a plain brightness offset elsewhere has a large one.
    # SSIM must rank the structural defect first, L2 the offset.
    side = 64
    image = torch.full((1, 3, side, side), 0.5)
    checker = (torch.arange(side).view(-1, 1) + torch.arange(side).view(1, -1)) % 2 * 2 - 1.0
    image[..., 8:24, 8:24] += 0.05 * checker[8:24, 8:24]  # structure the autoencoder "removed"
    reconstruction = torch.full((1, 3, side, side), 0.5)
    reconstruction[..., 40:56, 40:56] += 0.15  # a brightness error, no structure
    structural, offset = (slice(12, 20), slice(12, 20)), (slice(44, 52), slice(44, 52))
    for loss, first, second in (("l2", offset, structural), ("ssim", structural, offset)):
        _, maps = scorer(reconstruction, loss)(image)
        assert maps[0][first].min() > 5 * maps[0][second].max(), loss
    # the thesis' printed constants (c2 = 0.03 >> the defect's variance 0.0025) nearly hide it
    _, standard = scorer(reconstruction, "ssim")(image)
    _, printed = scorer(reconstruction, "ssim", ssim_constants="printed")(image)
    assert printed[0][structural].max() < standard[0][structural].min() / 5


def test_patchwise_maps_average_patch_maps_or_reconstructions():
    # a 'network' whose output depends on the patch (its mean), so the two averages differ
    class PatchMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x)

    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    corners = [(t, l) for t in (0, 16, 24) for l in (0, 16, 24)]  # 24 px patches at stride 16, the last flush
    expected_maps, expected_rec, count = torch.zeros(2, 48, 48), torch.zeros(2, 3, 48, 48), torch.zeros(48, 48)
    for t, l in corners:
        patch = images[..., t : t + 24, l : l + 24]
        expected_maps[:, t : t + 24, l : l + 24] += l2_map(patch, PatchMean()(patch))
        expected_rec[..., t : t + 24, l : l + 24] += PatchMean()(patch)
        count[t : t + 24, l : l + 24] += 1
    for average, expected in (("maps", expected_maps / count), ("reconstructions", l2_map(images, expected_rec / count))):
        module = AutoencoderScorer(PatchMean(), l2_map, grayscale=False, patch_size=24, patch_stride=16, patch_average=average, opening=0)
        scores, maps = module(images)
        torch.testing.assert_close(maps, expected)
        torch.testing.assert_close(scores, expected.flatten(1).amax(1))
    assert Autoencoder().options.patch_average == "maps"  # Ch. 4 by default


def test_the_opening_opens_every_thresholded_segmentation():
    from scipy import ndimage

    assert len(disk_offsets(4)) == 13 and len(disk_offsets(3)) == 9 and disk_offsets(1) == [(0, 0)]
    disk = np.zeros((5, 5), bool)
    for dy, dx in disk_offsets(4):
        disk[2 + dy, 2 + dx] = True
    maps = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(2))
    opened = open_maps(maps, 4)
    assert bool((opened <= maps).all())  # anti-extensive
    for threshold in (0.3, 0.6, 0.9):
        for image in range(2):
            binary = (maps[image] > threshold).numpy()
            # outside the image counts as foreground for the erosion, background for the dilation
            expected = ndimage.binary_dilation(ndimage.binary_erosion(binary, disk, border_value=1), disk, border_value=0)
            assert np.array_equal((opened[image] > threshold).numpy(), expected), (threshold, image)
    assert torch.equal(open_maps(maps, 0), maps)


def test_samples_are_patches_evenly_across_images_or_warped_whole_images():
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    plan = draw_plan(10, 3, 16, 8, torch.Generator().manual_seed(0))
    assert plan.source.bincount().tolist() == [4, 3, 3]  # evenly across the training images
    assert int(plan.top.max()) <= 8 and int(plan.left.max()) <= 8 and int(plan.top.min()) >= 0
    again = draw_plan(10, 3, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(plan.top, again.top) and torch.equal(plan.left, again.left)
    patches = render(images, plan, torch.tensor([0, 4]), 8)
    for patch, k in zip(patches, (0, 4)):
        t, l, source = int(plan.top[k]), int(plan.left[k]), int(plan.source[k])
        assert torch.equal(patch, images[source, :, t : t + 8, l : l + 8])
    # whole images: identity, mirrors and a quarter turn are exact; shifts move by whole pixels
    zero, no = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool)
    torch.testing.assert_close(warp(images, zero, torch.zeros(3, 2), no, no), images)
    torch.testing.assert_close(warp(images, zero, torch.zeros(3, 2), ~no, no), images.flip(-1))
    torch.testing.assert_close(warp(images, zero, torch.zeros(3, 2), no, ~no), images.flip(-2))
    quarter = warp(images, torch.full((3,), 90.0, dtype=torch.float64), torch.zeros(3, 2), no, no)
    assert any(torch.allclose(quarter, images.rot90(k, dims=(-2, -1)), atol=1e-5) for k in (1, 3))
    shifted = warp(images, zero, torch.tensor([[2 / 16, 0.0]] * 3), no, no)
    assert any(torch.allclose(shifted[..., :, 2:-2], images.roll(s, dims=-1)[..., :, 2:-2], atol=1e-5) for s in (2, -2))
    objects = draw_plan(1000, 2, 16, None, torch.Generator().manual_seed(0), rotation=3.0, translation=0.05, horizontal_flip=True)
    assert float(objects.angle.abs().max()) <= 3.0 and float(objects.shift.abs().max()) <= 0.05
    assert 400 < int(objects.hflip.sum()) < 600 and not bool(objects.vflip.any())
    assert math.isclose(float(objects.angle.abs().max()), 3.0, rel_tol=0.01)
