"""The numerical core: Perlin noise, rotation, swirl, texture augmenters and sources."""

import math

import numpy as np
import pytest
import torch

from vad.errors import VadError
from vad_augment.noise import fractal_noise_2d, perlin_noise_2d
from vad_augment.textures import TEXTURE_AUGMENTERS, FolderTextures, ProceduralTextures, augment_texture, hsv_to_rgb, rgb_to_hsv, texture_source
from vad_augment.warp import rotate_images, swirl_images


def draem_perlin_reference(shape, res, angles):
    """DRAEM's rand_perlin_2d_np written out in NumPy with given lattice angles (shape divisible by res)."""
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    tile = lambda s1, s2: np.repeat(np.repeat(gradients[s1[0] : s1[1], s2[0] : s2[1]], d[0], axis=0), d[1], axis=1)  # noqa: E731
    dot = lambda grad, shift: (np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), axis=-1) * grad).sum(axis=-1)  # noqa: E731
    n00 = dot(tile([0, -1], [0, -1]), [0, 0])
    n10 = dot(tile([1, None], [0, -1]), [-1, 0])
    n01 = dot(tile([0, -1], [1, None]), [0, -1])
    n11 = dot(tile([1, None], [1, None]), [-1, -1])
    t = fade(grid)
    lerp = lambda a, b, w: (b - a) * w + a  # noqa: E731
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (32, 4)])
def test_perlin_noise_matches_draem_construction(res):
    shape = (64, 64)
    noise = perlin_noise_2d(shape, res, torch.Generator().manual_seed(5), dtype=torch.float64)
    angles = 2 * math.pi * torch.rand((res[0] + 1, res[1] + 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = draem_perlin_reference(shape, res, angles.numpy())
    np.testing.assert_allclose(noise.numpy(), expected, atol=1e-10)


def test_perlin_noise_any_shape_is_deterministic_and_bounded():
    first = perlin_noise_2d((37, 50), (3, 7), torch.Generator().manual_seed(1))
    second = perlin_noise_2d((37, 50), (3, 7), torch.Generator().manual_seed(1))
    other = perlin_noise_2d((37, 50), (3, 7), torch.Generator().manual_seed(2))
    assert first.shape == (37, 50) and torch.equal(first, second) and not torch.equal(first, other)
    assert first.abs().max() <= 1.0 + 1e-6
    assert fractal_noise_2d((32, 32), (2, 2), torch.Generator().manual_seed(0)).shape == (32, 32)
    with pytest.raises(ValueError):
        perlin_noise_2d((8, 8), (0, 2), torch.Generator())


def test_rotation_by_zero_is_identity_and_quarter_turn_is_rot90():
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(rotate_images(x, torch.zeros(2)), x, atol=1e-5)
    turned = rotate_images(x, torch.tensor([90.0, 90.0]))
    # counter-clockwise in image (row-down) coordinates is torch.rot90 with dims (-1, -2) direction
    candidates = [torch.rot90(x, 1, (-2, -1)), torch.rot90(x, -1, (-2, -1))]
    assert min((turned - c).abs().max().item() for c in candidates) < 1e-4


def test_swirl_leaves_outside_of_the_disc_untouched():
    x = torch.rand(1, 3, 48, 48)
    out, mask = swirl_images(x, torch.tensor([[24.0, 20.0]]), torch.tensor([8.0]), torch.tensor([5.0]))
    outside = mask[:, 0] == 0
    assert torch.equal(out.permute(0, 2, 3, 1)[outside], x.permute(0, 2, 3, 1)[outside])
    assert (out != x).any() and 0 < mask.sum() < math.pi * 9**2


def test_hsv_round_trip():
    rgb = torch.rand(3, 20, 20)
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)


@pytest.mark.parametrize("augmenter", TEXTURE_AUGMENTERS, ids=lambda f: f.__name__)
def test_texture_augmenters_keep_shape_and_range(augmenter):
    texture = torch.rand(3, 32, 40)
    out = augmenter(texture, torch.Generator().manual_seed(0))
    assert out.shape == texture.shape and out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_augment_texture_is_deterministic_per_seed():
    texture = ProceduralTextures().sample(torch.Generator().manual_seed(3), 32, 32)
    a = augment_texture(texture, torch.Generator().manual_seed(9))
    b = augment_texture(texture, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_folder_textures_read_any_images(tmp_path):
    from PIL import Image

    (tmp_path / "banded").mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "banded" / "a.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    source = texture_source(str(tmp_path))
    assert isinstance(source, FolderTextures) and len(source.paths) == 2
    texture = source.sample(torch.Generator().manual_seed(0), 16, 24)
    assert texture.shape == (3, 16, 24)


def test_bad_texture_sources_are_clear_errors(tmp_path):
    with pytest.raises(VadError, match="does not exist"):
        texture_source(str(tmp_path / "missing"))
    with pytest.raises(VadError, match="holds no images"):
        texture_source(str(tmp_path))
    with pytest.raises(VadError, match="procedural"):
        texture_source("")


def test_skimage_textures_are_offline():
    texture = texture_source("skimage").sample(torch.Generator().manual_seed(0), 24, 24)
    assert texture.shape == (3, 24, 24) and texture.std() > 0
