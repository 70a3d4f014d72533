"""Decoding images and masks as the contract expects them (RGB uint8, bool masks).

Handles 8- and 16-bit, grayscale, palette and RGBA files; corrupt or unreadable files raise
:class:`vad.errors.VadError` naming the file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vad.errors import VadError

if TYPE_CHECKING:
    import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class BadImageError(VadError):
    """An image file that cannot be decoded."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        super().__init__(f"cannot read image {self.path}: {reason}")


def _open(path: str | os.PathLike, source=None):
    """The decoded PIL image of the file ``path`` (or of the file object ``source``, named ``path``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path if source is None else source)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(path, str(error) or type(error).__name__) from error
    return image


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]``; 16-bit data is scaled to 8 bits, alpha is dropped."""
    return _as_rgb(_open(path))


def decode_rgb(data: bytes, name: str) -> np.ndarray:
    """:func:`read_rgb` of an encoded image held in memory (``name`` says which, in errors)."""
    import io

    return _as_rgb(_open(name, io.BytesIO(data)))


def _as_rgb(image) -> np.ndarray:
    import numpy as np

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the full range by scaling, not by clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        maximum = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
        gray = np.clip(np.round(array / maximum * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Bool ``[H, W]``: any non-zero pixel (in any channel) is defective."""
    import numpy as np

    array = np.asarray(_open(path))
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as error:
        raise BadImageError(path, str(error)) from error
    return height, width
