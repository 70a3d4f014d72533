"""Anomaly texture sources and DRAEM's random texture augmentations.

DRAEM blends textures from the Describable Textures Dataset (DTD) into normal images, each
texture first passed through three of ten imgaug augmenters picked at random. Here:

* :class:`FolderTextures` reads any folder of images (DTD's ``images/`` folder, for instance);
* :class:`SkimageTextures` uses scikit-image's bundled CC0 textures (brick, grass, gravel);
* :class:`ProceduralTextures` (the default) generates coloured noise, stripe and band textures
  from the generator, so nothing has to be downloaded;
* :func:`augment_texture` re-implements the ten augmenters in torch (list below) so that every
  draw comes from the caller's :class:`torch.Generator`.

Textures are ``[3, H, W]`` float tensors in [0, 1].
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vad.errors import VadError
from vad_augment.noise import fractal_noise_2d, integers, uniform
from vad_augment.warp import rotate_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# ----------------------------------------------------------------------- colour helpers


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB in [0, 1] to HSV with all three channels in [0, 1]."""
    red, green, blue = rgb[0], rgb[1], rgb[2]
    value, argmax = rgb.max(dim=0)
    minimum = rgb.min(dim=0).values
    delta = value - minimum
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    safe = delta.clamp_min(1e-12)
    hue = torch.where(
        argmax == 0,
        ((green - blue) / safe) % 6,
        torch.where(argmax == 1, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack((hue, saturation, value))


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = hsv[0] % 1.0, hsv[1], hsv[2]
    k = torch.stack([(n + hue * 6) % 6 for n in (5.0, 3.0, 1.0)])
    return value - value * saturation * (torch.minimum(k, 4 - k).clamp(0, 1))


# ------------------------------------------------------------ DRAEM's texture augmenters
# Each takes a texture [3, H, W] in [0, 1] and the generator; ranges are imgaug's as DRAEM sets
# them (pixel values of imgaug's 0..255 scale divided by 255).


def gamma_contrast(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.GammaContrast((0.5, 2.0), per_channel=True)``: ``v ** gamma`` per channel."""
    gammas = uniform(generator, 3, 0.5, 2.0).to(texture)
    return texture.clamp(0, 1) ** gammas.view(3, 1, 1)


def brightness(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))`` on the luma (Y) channel."""
    mul, add = uniform(generator, 1, 0.8, 1.2).item(), uniform(generator, 1, -30, 30).item() / 255
    luma = (0.299 * texture[0] + 0.587 * texture[1] + 0.114 * texture[2]).unsqueeze(0)
    # Adding the same amount to R, G and B moves Y by that amount and keeps the chroma.
    return (texture + (luma * mul + add - luma)).clamp(0, 1)


def sharpness(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.pillike.EnhanceSharpness()`` (factor in [0, 2]): PIL's blend with its SMOOTH filter."""
    factor = uniform(generator, 1, 0.0, 2.0).item()
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=texture.device) / 13
    smooth = F.conv2d(texture.unsqueeze(1), kernel.view(1, 1, 3, 3), padding=1).squeeze(1)
    smooth[:, 0], smooth[:, -1], smooth[:, :, 0], smooth[:, :, -1] = texture[:, 0], texture[:, -1], texture[:, :, 0], texture[:, :, -1]
    return torch.lerp(smooth, texture, factor).clamp(0, 1)


def hue_saturation(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.AddToHueAndSaturation((-50, 50), per_channel=True)``: independent hue and
    saturation shifts; imgaug maps hue values in [-255, 255] to [-180, 180] degrees."""
    hue_shift, saturation_shift = uniform(generator, 2, -50, 50).tolist()
    hsv = rgb_to_hsv(texture)
    hsv[0] = hsv[0] + hue_shift / 255 / 2
    hsv[1] = (hsv[1] + saturation_shift / 255).clamp(0, 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def solarize(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.Solarize(0.5, threshold=(32, 128))``: half the time, invert values above the threshold."""
    apply, threshold = uniform(generator, 1).item() < 0.5, uniform(generator, 1, 32, 128).item() / 255
    return torch.where(texture >= threshold, 1 - texture, texture) if apply else texture


def posterize(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.Posterize()`` (1 to 8 bits): keep the ``bits`` most significant bits of each value."""
    bits = int(integers(generator, 1, 1, 9).item())
    step = 2 ** (8 - bits)
    return torch.floor(torch.round(texture * 255) / step) * step / 255


def invert(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.Invert()``: ``1 - v``."""
    return 1 - texture


def autocontrast(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.pillike.Autocontrast()``: per channel, cut 0-20 % of each histogram tail and
    stretch the rest to [0, 1]."""
    cutoff = uniform(generator, 1, 0.0, 0.2).item()
    flat = texture.reshape(3, -1)
    if flat.shape[1] > 1 << 16:  # quantiles of a strided subset: same up to sampling, much cheaper
        flat = flat[:, :: flat.shape[1] // (1 << 16) + 1]
    low = torch.quantile(flat, cutoff, dim=1).view(3, 1, 1)
    high = torch.quantile(flat, 1 - cutoff, dim=1).view(3, 1, 1)
    stretched = (texture - low) / (high - low).clamp_min(1e-6)
    return torch.where(high > low, stretched.clamp(0, 1), texture)


def equalize(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.pillike.Equalize()``: per-channel histogram equalisation on 256 levels."""
    levels = torch.round(texture.clamp(0, 1) * 255).long().reshape(3, -1)
    out = torch.empty(levels.shape, device=texture.device, dtype=texture.dtype)
    for channel in range(3):
        cdf = torch.bincount(levels[channel], minlength=256).cumsum(0).to(texture.dtype)
        first = cdf[cdf > 0][0]
        lut = ((cdf - first) / (cdf[-1] - first).clamp_min(1)).clamp(0, 1)
        out[channel] = lut[levels[channel]]
    return out.view_as(texture)


def rotate(texture: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``iaa.Affine(rotate=(-45, 45))``: rotation with zero fill."""
    angle = uniform(generator, 1, -45, 45).to(texture)
    return rotate_images(texture.unsqueeze(0), angle).squeeze(0)


#: The ten augmenters of DRAEM's ``data_loader.py``, in its order.
TEXTURE_AUGMENTERS: tuple[Callable[[torch.Tensor, torch.Generator], torch.Tensor], ...] = (
    gamma_contrast,
    brightness,
    sharpness,
    hue_saturation,
    solarize,
    posterize,
    invert,
    autocontrast,
    equalize,
    rotate,
)


def augment_texture(texture: torch.Tensor, generator: torch.Generator, count: int = 3) -> torch.Tensor:
    """Apply ``count`` distinct augmenters of :data:`TEXTURE_AUGMENTERS`, picked at random, in
    the picked order (DRAEM's ``randAugmenter``: 3 of 10 without replacement)."""
    order = torch.randperm(len(TEXTURE_AUGMENTERS), generator=generator, device=generator.device).cpu()
    for index in order[:count].tolist():
        texture = TEXTURE_AUGMENTERS[index](texture, generator)
    return texture


def resize_texture(texture: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``[3, h, w]`` to ``[3, height, width]`` (aspect ratio not kept, as DRAEM's cv2.resize)."""
    if tuple(texture.shape[-2:]) == (height, width):
        return texture
    resized = F.interpolate(texture.unsqueeze(0), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized.squeeze(0).clamp(0, 1)


# ------------------------------------------------------------------------------ sources


class TextureSource:
    """Where anomaly textures come from: ``sample`` returns one ``[3, H, W]`` texture."""

    def sample(self, generator: torch.Generator, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """One texture at ``height x width`` on ``device``, chosen with ``generator``."""
        raise NotImplementedError


def _ramp(values: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Map ``values`` in [0, 1] ``[H, W]`` linearly through the ``[K, 3]`` colour stops."""
    stops = colors.shape[0] - 1
    position = values.clamp(0, 1) * stops
    index = position.floor().long().clamp(max=stops - 1)
    frac = (position - index).unsqueeze(0)
    return torch.lerp(colors[index].permute(2, 0, 1), colors[index + 1].permute(2, 0, 1), frac)


def _normalise(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min()).clamp_min(1e-6)


class ProceduralTextures(TextureSource):
    """Textures generated from the generator: coloured fractal noise, warped stripes, and
    posterised colour bands, each with fine grain. A stand-in for DTD that needs no download."""

    def sample(self, generator: torch.Generator, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """One procedural texture (kind, scale, colours and grain all drawn from ``generator``)."""
        kind = int(integers(generator, 1, 0, 3).item())
        res = tuple(int(v) for v in integers(generator, 2, 1, 9).tolist())
        octaves = int(integers(generator, 1, 2, 6).item())
        noise = _normalise(fractal_noise_2d((height, width), res, generator, octaves=octaves, device=device))
        colors = uniform(generator, (4, 3)).to(device=device, dtype=torch.float32)
        if kind == 0:  # coloured fractal noise
            texture = _ramp(noise, colors[:3])
        elif kind == 1:  # stripes warped by the noise
            angle, period = uniform(generator, 1, 0, math.pi).item(), uniform(generator, 1, 3, max(4.0, min(height, width) / 4)).item()
            warp, square = uniform(generator, 1, 0, 2 * period).item(), uniform(generator, 1).item() < 0.5
            rows = torch.arange(height, device=device, dtype=torch.float32).view(-1, 1)
            cols = torch.arange(width, device=device, dtype=torch.float32).view(1, -1)
            phase = (cols * math.cos(angle) + rows * math.sin(angle) + warp * noise) * (2 * math.pi / period)
            wave = torch.sin(phase)
            wave = (wave > 0).float() if square else 0.5 + 0.5 * wave
            texture = _ramp(wave, colors[:2])
        else:  # posterised colour bands of the noise
            bands = torch.floor(noise * 3.999) / 3
            texture = _ramp(bands, colors)
        grain = uniform(generator, 1, 0.0, 0.08).item()
        texture = texture + grain * (torch.rand(texture.shape, generator=generator, device=generator.device).to(device) - 0.5)
        return texture.clamp(0, 1)


class SkimageTextures(TextureSource):
    """scikit-image's bundled CC0 textures (``brick``, ``grass``, ``gravel``; 512 px grey), a random
    crop of 1/4 to all of the side, resized to the requested size."""

    NAMES = ("brick", "grass", "gravel")

    def __init__(self) -> None:
        try:
            import skimage.data
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise VadError("textures='skimage' needs scikit-image: pip install scikit-image (or use textures='procedural')") from error
        self.images = [torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0) for name in self.NAMES]

    def sample(self, generator: torch.Generator, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A random crop of one texture, grey repeated to three channels."""
        image = self.images[int(integers(generator, 1, 0, len(self.images)).item())]
        side = min(image.shape)
        crop = max(8, int(side * uniform(generator, 1, 0.25, 1.0).item()))
        top, left = (int(v) for v in integers(generator, 2, 0, side - crop + 1).tolist())
        patch = image[top : top + crop, left : left + crop].to(device)
        return resize_texture(patch.unsqueeze(0).expand(3, -1, -1), height, width)


class FolderTextures(TextureSource):
    """Every image under ``folder`` (recursively; png, jpg, bmp, tif, webp), e.g. DTD's ``images/``.

    Files are listed once, sorted (so a seed picks the same files on every machine), decoded on
    use and kept in a small cache of recently used images.
    """

    CACHE_SIZE = 64

    def __init__(self, folder: str) -> None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise VadError(
                f"texture folder {folder!r} does not exist or is not a folder; give a folder of images "
                "(e.g. DTD's images/), or textures='procedural' / 'skimage'"
            )
        self.paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise VadError(f"texture folder {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def _load(self, path: Path) -> torch.Tensor:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        from vad.images import read_rgb

        tensor = torch.from_numpy(np.ascontiguousarray(read_rgb(path))).permute(2, 0, 1).float() / 255.0
        self._cache[path] = tensor
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return tensor

    def sample(self, generator: torch.Generator, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """One image of the folder, resized to ``height x width``."""
        path = self.paths[int(integers(generator, 1, 0, len(self.paths)).item())]
        return resize_texture(self._load(path).to(device), height, width)


def texture_source(spec: str) -> TextureSource:
    """``"procedural"``, ``"skimage"`` or a folder of images -> a :class:`TextureSource`."""
    if not isinstance(spec, str) or not spec:
        raise VadError(f"textures must be 'procedural', 'skimage' or a folder of images, got {spec!r}")
    if spec == "procedural":
        return ProceduralTextures()
    if spec == "skimage":
        return SkimageTextures()
    return FolderTextures(spec)
