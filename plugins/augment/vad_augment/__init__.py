"""vad-augment: synthetic-anomaly generators and image transforms (``vad list augmentations``).

* ``perlin`` -- DRAEM's generator (Zavrtanik et al., ICCV 2021): a thresholded, rotated Perlin
  noise mask blended with an augmented texture (any folder of images, scikit-image's CC0
  textures, or procedural textures generated on the fly -- the default, nothing to download);
* ``cutout`` -- the white-rectangle anomaly of seed 001 (line clearance: leaflets, blisters);
* ``swirl`` -- the local "twist" of seed 003 (a swirl warp of a small disc);
* ``rotate`` -- a plain random rotation (DRAEM rotates 30 % of its training images).

Every one is a :class:`vad.contracts.Augmentation`: ``aug(x, generator) -> (x_aug, mask)`` on
``[B, 3, H, W]`` images in [0, 1], all randomness drawn from ``generator``. The numerical
pieces are plain functions in :mod:`vad_augment.noise`, :mod:`vad_augment.warp` and
:mod:`vad_augment.textures`. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_augmentations(register):
    """Register the anomaly generators and the rotation transform."""
    register(
        "vad_augment.generators:PerlinTextureAnomaly",
        name="perlin",
        summary="DRAEM anomaly: Perlin-noise mask blended with an augmented texture (folder, skimage or procedural).",
    )
    register(
        "vad_augment.generators:CutoutAnomaly",
        name="cutout",
        summary="Cutout anomaly of seed 001: a white rectangle of random size and position.",
    )
    register(
        "vad_augment.generators:SwirlAnomaly",
        name="swirl",
        summary="Local twist of seed 003: a swirl warp of a small random disc.",
    )
    register(
        "vad_augment.generators:RandomRotation",
        name="rotate",
        summary="Plain transform: rotate images by a random angle (zero fill), as DRAEM does to 30 % of its inputs.",
    )
