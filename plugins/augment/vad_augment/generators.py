"""The registered augmentations: DRAEM's Perlin + texture anomaly, cutout, local swirl, rotation.

Each is a :class:`vad.contracts.Augmentation`: ``aug(x, generator) -> (x_aug, mask)`` with ``x``
``[B, 3, H, W]`` in [0, 1] on any device, ``mask`` ``[B, 1, H, W]`` with values 0/1 (None for the
plain rotation), and every random draw taken from ``generator``: the same seed gives the same
batch. Pixels where the mask is 0 are returned bit-identical. ``probability`` is the chance that
a given image gets an anomaly at all (DRAEM leaves 50 % of its training images normal; seed 003
made 75 % of its synthetic validation images anomalous).
"""

from __future__ import annotations

from typing import Any

import torch

from vad.contracts import Augmentation
from vad.errors import VadError
from vad.options import option
from vad_augment.noise import integers, perlin_noise_2d, uniform
from vad_augment.textures import augment_texture, texture_source
from vad_augment.warp import rotate_images, swirl_images


def check_images(x: Any, name: str) -> None:
    """Refuse anything but a float ``[B, 3, H, W]`` batch with values in [0, 1]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise VadError(f"augmentation {name!r} takes an image batch [B, 3, H, W], got {shape}")
    if not x.is_floating_point():
        raise VadError(f"augmentation {name!r} takes float images in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise VadError(
            f"augmentation {name!r} takes images in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
            "apply it before mean/std normalisation"
        )


def require_ordered(options: Augmentation.Options, *names: str) -> None:
    """Refuse a ``(min, max)`` range option whose min exceeds its max (for ``Options.check``)."""
    for name in names:
        low, high = getattr(options, name)
        if low > high:
            raise options.invalid(name, "a range (min, max) with min <= max")


class AnomalyGenerator(Augmentation):
    """Shared loop: decide per image whether it gets an anomaly, then call :meth:`anomaly`."""

    name = ""
    target = "image"

    class Options(Augmentation.Options):
        probability: float = option(1.0, "Chance that an image gets an anomaly (the others come back unchanged).", ge=0, le=1)

    def anomaly(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(anomalous image [3, H, W], mask [1, H, W])`` for one image."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomalous batch and masks; images drawn as normal come back unchanged with a zero mask."""
        check_images(x, self.name)
        chosen = (uniform(generator, x.shape[0]) < self.options.probability).tolist()
        out, masks = x.clone(), torch.zeros((x.shape[0], 1, *x.shape[2:]), device=x.device, dtype=x.dtype)
        for index, apply in enumerate(chosen):
            if apply:
                out[index], masks[index] = self.anomaly(x[index], generator)
        return out, masks


class PerlinTextureAnomaly(AnomalyGenerator):
    """DRAEM's anomaly: a Perlin-noise mask blended with an augmented texture.

    Per image, as DRAEM's ``data_loader.py``: Perlin noise with ``2**k`` lattice periods per axis
    (``k`` uniform in ``[min_scale, max_scale)``, 0..5 by default), rotated by U(-rotate, rotate)
    degrees (zero fill), thresholded at ``threshold`` (0.5) into the mask ``M``; a texture from
    ``textures`` passed through ``augmenters`` (3) of DRAEM's ten texture augmentations; blended as
    ``x_a = (1 - M) x + M ((1 - beta) x + beta A)`` with the texture opacity ``beta`` uniform in
    ``opacity``.

    Deviation: ``opacity`` defaults to the paper's [0.1, 1.0]; the official code draws the texture
    weight in (0.2, 1.0] (``beta = rand() * 0.8`` on the image side); pass ``opacity=(0.2, 1.0)``
    to match it. ``textures``: ``"procedural"`` (default, generated, no download), ``"skimage"``
    (scikit-image's CC0 textures) or a folder of images such as DTD's ``images/``.
    """

    name = "perlin"

    class Options(AnomalyGenerator.Options):
        textures: str = option(
            "procedural",
            "Anomaly textures: 'procedural' (generated, no download), 'skimage' (CC0 textures) or a folder of images (DTD's images/).",
            rule=(bool, "not empty ('procedural', 'skimage' or a folder of images)"),
        )
        min_scale: int = option(0, "Smallest Perlin scale k (2**k lattice periods per axis), inclusive (DRAEM: 0).", ge=0, le=10)
        max_scale: int = option(6, "Largest Perlin scale k, exclusive (DRAEM: 6).", ge=0, le=10)
        threshold: float = option(0.5, "Noise level above which a pixel is anomalous (DRAEM: 0.5).", gt=-1, lt=1)
        opacity: tuple[float, float] = option(
            (0.1, 1.0), "Range (min, max) of the texture opacity beta (paper: [0.1, 1]; official code: (0.2, 1]).", ge=0, le=1
        )
        rotate: float = option(90.0, "Perlin mask rotated by U(-rotate, rotate) degrees (DRAEM: 90).")
        augmenters: int = option(3, "How many of DRAEM's 10 texture augmenters to apply (DRAEM: 3).", ge=0, le=10)

        def check(self) -> None:
            if self.min_scale >= self.max_scale:
                raise self.invalid("min_scale", f"below max_scale ({self.max_scale})")
            require_ordered(self, "opacity")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.texture_source = texture_source(self.options.textures)

    def perlin_mask(self, height: int, width: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """DRAEM's binary anomaly mask ``[1, H, W]`` (0/1 floats)."""
        options = self.options
        scale_y, scale_x = (2 ** int(k) for k in integers(generator, 2, options.min_scale, options.max_scale).tolist())
        noise = perlin_noise_2d((height, width), (scale_y, scale_x), generator, device=device)
        angle = uniform(generator, 1, -options.rotate, options.rotate)
        noise = rotate_images(noise.view(1, 1, height, width), angle).view(1, height, width)
        return (noise > options.threshold).float()

    def anomaly(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Blend one augmented texture into ``image`` where the Perlin mask is 1."""
        _, height, width = image.shape
        mask = self.perlin_mask(height, width, generator, image.device).to(image.dtype)
        texture = self.texture_source.sample(generator, height, width, image.device)
        texture = augment_texture(texture, generator, self.options.augmenters).to(image.dtype)
        beta = uniform(generator, 1, *self.options.opacity).item()
        blended = torch.lerp(image, texture, beta)
        return torch.where(mask.bool(), blended, image), mask


class CutoutAnomaly(AnomalyGenerator):
    """Seed 001's cutout: a ``color`` (white) rectangle pasted at a random position.

    The thesis gives "a feasible size (not too large or too small)"; here height and width are
    each a uniform fraction ``size`` (default 10-30 %) of the image side, the rectangle lies fully
    inside the image, and the mask is the rectangle.
    """

    name = "cutout"

    class Options(AnomalyGenerator.Options):
        size: tuple[float, float] = option(
            (0.1, 0.3), "Range (min, max) of the rectangle's height and width as fractions of the image side.", ge=0, le=1
        )
        color: tuple[float, float, float] = option((1.0, 1.0, 1.0), "RGB colour of the rectangle in [0, 1] (white, as seed 001).", ge=0, le=1)

        def check(self) -> None:
            require_ordered(self, "size")

    def anomaly(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Paste one rectangle."""
        _, height, width = image.shape
        fractions = uniform(generator, 2, *self.options.size).tolist()
        box_h = min(height, max(1, round(fractions[0] * height)))
        box_w = min(width, max(1, round(fractions[1] * width)))
        top = int(integers(generator, 1, 0, height - box_h + 1).item())
        left = int(integers(generator, 1, 0, width - box_w + 1).item())
        mask = torch.zeros((1, height, width), device=image.device, dtype=image.dtype)
        mask[:, top : top + box_h, left : left + box_w] = 1
        color = torch.tensor(self.options.color, device=image.device, dtype=image.dtype).view(3, 1, 1)
        return torch.where(mask.bool(), color, image), mask


class SwirlAnomaly(AnomalyGenerator):
    """Seed 003's local "twist": ``regions`` discs of the image swirled (scikit-image's formula).

    Seed 003 names no parameters; here the radius is a uniform fraction ``radius`` of the shorter
    side (5-15 %), the strength uniform in ``strength`` radians with a random sign, the centre
    uniform over positions that keep the disc inside the image. The mask is the disc.
    """

    name = "swirl"

    class Options(AnomalyGenerator.Options):
        radius: tuple[float, float] = option(
            (0.05, 0.15), "Range (min, max) of the disc radius as a fraction of the shorter image side.", ge=0, le=0.5
        )
        strength: tuple[float, float] = option(
            (3.0, 8.0), "Range (min, max) of the swirl strength in radians (random sign).", ge=0, le=100
        )
        regions: int = option(1, "Discs swirled per anomalous image.", ge=1)

        def check(self) -> None:
            require_ordered(self, "radius", "strength")

    def anomaly(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Swirl ``regions`` discs one after the other; the mask is their union."""
        _, height, width = image.shape
        out = image.unsqueeze(0)
        mask = torch.zeros((1, 1, height, width), device=image.device, dtype=image.dtype)
        for _ in range(self.options.regions):
            radius = max(1.0, uniform(generator, 1, *self.options.radius).item() * min(height, width))
            strength = uniform(generator, 1, *self.options.strength).item() * (1 if uniform(generator, 1).item() < 0.5 else -1)
            low_y, high_y = (radius, height - 1 - radius) if height - 1 > 2 * radius else (0.0, height - 1.0)
            low_x, high_x = (radius, width - 1 - radius) if width - 1 > 2 * radius else (0.0, width - 1.0)
            center = torch.stack((uniform(generator, 1, low_y, high_y), uniform(generator, 1, low_x, high_x)), dim=1)
            out, disc = swirl_images(out, center, torch.tensor([radius]), torch.tensor([strength]))
            mask = torch.maximum(mask, disc)
        return out.squeeze(0), mask.squeeze(0)


class RandomRotation(Augmentation):
    """Rotate each image, with chance ``probability``, by U(-degrees, degrees) about its centre
    (zero fill). DRAEM does this to 30 % of its training images (``degrees=90``). No mask."""

    name = "rotate"
    target = "image"

    class Options(Augmentation.Options):
        degrees: float = option(90.0, "Largest rotation angle in degrees, either way (DRAEM: 90).", ge=0, le=180)
        probability: float = option(1.0, "Chance that an image is rotated (DRAEM: 0.3).", ge=0, le=1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        """The rotated batch (images drawn as not rotated are returned unchanged) and None."""
        check_images(x, self.name)
        chosen = uniform(generator, x.shape[0]) < self.options.probability
        angles = uniform(generator, x.shape[0], -self.options.degrees, self.options.degrees)
        if not chosen.any():
            return x.clone(), None
        rotated = rotate_images(x, angles)
        keep = chosen.to(x.device).view(-1, 1, 1, 1)
        return torch.where(keep, rotated, x), None


BUILTIN_GENERATORS: dict[str, type[AnomalyGenerator]] = {"perlin": PerlinTextureAnomaly, "cutout": CutoutAnomaly, "swirl": SwirlAnomaly}


def anomaly_generators(names: list[str], options: dict[str, dict[str, Any]], owner: str) -> list[Augmentation]:
    """The anomaly generators ``names`` (this package's, else any registered augmentation) built
    with ``options[name]``. Each is probed once on a blank image, with its own generator so no
    caller's randomness is used, and a transform without masks is refused (``owner`` names the
    caller in the message) before any training or scoring starts."""
    generators = []
    for name in names:
        if name in BUILTIN_GENERATORS:
            cls: type[Augmentation] = BUILTIN_GENERATORS[name]
        else:
            from vad.plugins import get_registry

            cls = get_registry().load_class("augmentations", name)
        augmentation = cls(**options.get(name, {}))
        probe = torch.full((1, 3, 32, 32), 0.5)
        if getattr(augmentation, "target", "image") != "image" or augmentation(probe, torch.Generator().manual_seed(0))[1] is None:
            raise VadError(f"{owner}: augmentation {name!r} returns no anomaly mask, so it is not an anomaly generator")
        generators.append(augmentation)
    return generators


def one_anomaly_each(
    images: torch.Tensor, generators: list[Augmentation], generator: torch.Generator, normal_probability: float, owner: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One path per image of ``[B, 3, H, W]``: left normal (``normal_probability``) or given an
    anomaly by one of ``generators`` chosen uniformly (seed 001's none / Perlin / cutout).
    Returns the batch and the binary masks ``[B, 1, H, W]``."""
    count = images.shape[0]
    normal = uniform(generator, count) < normal_probability
    which = integers(generator, count, 0, len(generators))
    augmented = images.clone()
    masks = torch.zeros((count, 1, *images.shape[2:]), device=images.device, dtype=images.dtype)
    for index, anomaly in enumerate(generators):
        chosen = torch.nonzero(~normal & (which == index)).flatten().tolist()
        if not chosen:
            continue
        out, mask = anomaly(images[chosen], generator)
        if mask is None:
            raise VadError(f"{owner}: augmentation {anomaly.name!r} returns no mask, so it is not an anomaly generator")
        augmented[chosen], masks[chosen] = out, (mask > 0.5).to(images.dtype)
    return augmented, masks
