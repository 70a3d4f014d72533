"""The registered augmentations: masks, determinism, bad inputs, registration."""

import pytest
import torch

from vad.errors import VadError
from vad_augment.generators import CutoutAnomaly, PerlinTextureAnomaly, RandomRotation, SwirlAnomaly


def changed_pixels(before, after):
    return (before != after).any(dim=1, keepdim=True)


@pytest.mark.parametrize("textures", ["procedural", "skimage"])
def test_perlin_mask_is_exactly_where_the_blend_changed_the_image(images, textures):
    augmented, mask = PerlinTextureAnomaly(textures=textures)(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape and mask.shape == (4, 1, 64, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    assert torch.equal(changed_pixels(images, augmented), mask.bool())
    assert augmented.min() >= 0 and augmented.max() <= 1


def test_cutout_mask_is_exactly_the_white_rectangle(images):
    augmented, mask = CutoutAnomaly()(images, torch.Generator().manual_seed(0))
    assert torch.equal(changed_pixels(images, augmented), mask.bool())
    for index in range(4):
        rows, cols = torch.nonzero(mask[index, 0], as_tuple=True)
        box = mask[index, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all(), "the mask is one filled rectangle"
        side = (rows.max() - rows.min() + 1).item()
        assert round(0.1 * 64) <= side <= round(0.3 * 64)
        assert (augmented[index][:, mask[index, 0].bool()] == 1).all()


def test_swirl_changes_only_inside_its_mask(images):
    augmented, mask = SwirlAnomaly(regions=2)(images, torch.Generator().manual_seed(0))
    changed = changed_pixels(images, augmented)
    assert changed.any() and not (changed & ~mask.bool()).any()
    assert mask.sum(dim=(1, 2, 3)).min() > 0


@pytest.mark.parametrize("cls", [PerlinTextureAnomaly, CutoutAnomaly, SwirlAnomaly])
def test_same_seed_same_anomalies_other_seed_others(images, cls):
    generator = cls()
    first = generator(images, torch.Generator().manual_seed(7))
    second = generator(images, torch.Generator().manual_seed(7))
    third = generator(images, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], third[1])


def test_probability_leaves_some_images_normal(images):
    batch = images.repeat(4, 1, 1, 1)
    augmented, mask = CutoutAnomaly(probability=0.5)(batch, torch.Generator().manual_seed(1))
    untouched = mask.flatten(1).sum(1) == 0
    assert 0 < untouched.sum() < len(batch)
    assert torch.equal(augmented[untouched], batch[untouched])
    none, none_mask = CutoutAnomaly(probability=0.0)(images, torch.Generator())
    assert torch.equal(none, images) and none_mask.sum() == 0


def test_rotation_transform_returns_no_mask(images):
    rotated, mask = RandomRotation(probability=1.0)(images, torch.Generator().manual_seed(0))
    assert mask is None and rotated.shape == images.shape and not torch.equal(rotated, images)
    same, _ = RandomRotation(probability=0.0)(images, torch.Generator())
    assert torch.equal(same, images)


@pytest.mark.parametrize(
    "bad",
    [torch.rand(3, 64, 64), torch.rand(2, 1, 64, 64), torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), torch.rand(2, 3, 8, 8) * 255],
    ids=["3d", "one-channel", "uint8", "not-0-1"],
)
def test_bad_images_are_refused_and_left_unchanged(bad):
    before = bad.clone()
    for generator in (CutoutAnomaly(), SwirlAnomaly(), RandomRotation()):
        with pytest.raises(VadError):
            generator(bad, torch.Generator())
    assert torch.equal(bad, before)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: PerlinTextureAnomaly(opacity=(0.5, 0.1)),
        lambda: PerlinTextureAnomaly(min_scale=3, max_scale=3),
        lambda: PerlinTextureAnomaly(threshold=2.0),
        lambda: PerlinTextureAnomaly(augmenters=11),
        lambda: CutoutAnomaly(size=(0.2, 1.5)),
        lambda: CutoutAnomaly(color=(1.0, 2.0, 0.0)),
        lambda: CutoutAnomaly(probability=1.5),
        lambda: SwirlAnomaly(radius="big"),
        lambda: SwirlAnomaly(regions=0),
        lambda: RandomRotation(degrees=270),
    ],
)
def test_bad_options_are_clear_errors(factory):
    with pytest.raises(VadError):
        factory()


def test_generators_work_on_batches_of_any_size():
    images = torch.rand(2, 3, 40, 56)
    for generator in (PerlinTextureAnomaly(), CutoutAnomaly(), SwirlAnomaly()):
        augmented, mask = generator(images, torch.Generator().manual_seed(0))
        assert augmented.shape == images.shape and mask.shape == (2, 1, 40, 56)
        assert not (changed_pixels(images, augmented) & ~mask.bool()).any()


def test_registered_through_the_entry_point():
    from vad.plugins import get_registry

    registry = get_registry()
    entries = registry.entries("augmentations")
    assert {"perlin", "cutout", "swirl", "rotate"} <= set(entries)
    assert entries["perlin"].plugin.distribution == "vad-augment"
    assert registry.load_class("augmentations", "perlin") is PerlinTextureAnomaly
