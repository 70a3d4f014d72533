"""The registered augmentations: masks, determinism, bad inputs, registration."""

import pytest
import torch

from vad.errors import VadError
from vad.options import OptionError
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
    ("factory", "message"),
    [
        (lambda: PerlinTextureAnomaly(opacity=(0.5, 0.1)), r"'perlin': option opacity=\(0.5, 0.1\) is not allowed; opacity must be a range \(min, max\) with min <= max"),
        (lambda: PerlinTextureAnomaly(min_scale=3, max_scale=3), r"'perlin': option min_scale=3 is not allowed; min_scale must be below max_scale \(3\)"),
        (lambda: PerlinTextureAnomaly(threshold=2.0), r"'perlin': option threshold=2.0 is not allowed; threshold must be a number, > -1 and < 1"),
        (lambda: PerlinTextureAnomaly(augmenters=11), r"'perlin': option augmenters=11 is not allowed; augmenters must be an integer, >= 0 and <= 10"),
        (lambda: PerlinTextureAnomaly(textures=""), r"'perlin': option textures='' is not allowed; textures must be a string, not empty \('procedural'"),
        (lambda: CutoutAnomaly(size=(0.2, 1.5)), r"'cutout': option size=\(0.2, 1.5\) is not allowed; size must be a list of 2 numbers, >= 0 and <= 1"),
        (lambda: CutoutAnomaly(color=(1.0, 2.0, 0.0)), r"'cutout': option color=\(1.0, 2.0, 0.0\) is not allowed; color must be a list of 3 numbers, >= 0 and <= 1"),
        (lambda: CutoutAnomaly(color=(1.0, 1.0)), r"'cutout': option color=\(1.0, 1.0\) is not allowed; color must be a list of 3 numbers"),
        (lambda: CutoutAnomaly(probability=1.5), r"'cutout': option probability=1.5 is not allowed; probability must be a number, >= 0 and <= 1"),
        (lambda: SwirlAnomaly(radius="big"), r"'swirl': option radius='big' is not allowed; radius must be a list of 2 numbers, >= 0 and <= 0.5"),
        (lambda: SwirlAnomaly(strength=(8.0, 3.0)), r"'swirl': option strength=\(8.0, 3.0\) is not allowed; strength must be a range \(min, max\) with min <= max"),
        (lambda: SwirlAnomaly(regions=0), r"'swirl': option regions=0 is not allowed; regions must be an integer, >= 1"),
        (lambda: RandomRotation(degrees=270), r"'rotate': option degrees=270 is not allowed; degrees must be a number, >= 0 and <= 180"),
        (lambda: RandomRotation(probability=-0.1), r"'rotate': option probability=-0.1 is not allowed; probability must be a number, >= 0 and <= 1"),
    ],
)
def test_bad_options_are_clear_errors(factory, message):
    with pytest.raises(OptionError, match=r"^augmentation " + message):
        factory()


def test_unknown_options_suggest_the_nearest():
    with pytest.raises(VadError, match=r"augmentation 'swirl' has no option 'strenght' \(did you mean 'strength'\?\); its options are: probability, radius"):
        SwirlAnomaly(strenght=(1.0, 2.0))


def test_options_are_declared_coerced_and_rebuild_the_augmentation():
    perlin = PerlinTextureAnomaly(opacity=[0.2, 1], min_scale="1", probability="0.5")
    assert perlin.options.opacity == (0.2, 1.0) and perlin.options.min_scale == 1 and perlin.options.probability == 0.5
    assert perlin.hparams == {
        "probability": 0.5, "textures": "procedural", "min_scale": 1, "max_scale": 6, "threshold": 0.5,
        "opacity": [0.2, 1.0], "rotate": 90.0, "augmenters": 3,
    }  # fmt: skip
    assert PerlinTextureAnomaly(**perlin.hparams).options == perlin.options
    rotation = RandomRotation(degrees=90.0, probability=0.3)  # as DRAEM builds it
    assert rotation.hparams == {"degrees": 90.0, "probability": 0.3}
    for cls in (CutoutAnomaly, SwirlAnomaly):
        assert cls(**cls().hparams).options == cls().options


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
