"""Input geometry: the size the networks see, resize + centre crop, aspect ratio, and tiles.

One frozen :class:`Geometry` per model says how an image becomes network inputs, for every
member alike (``vad run --image-size/--resize/--center-crop/--keep-aspect/--tile/--tile-stride``,
saved as the ``geometry`` entry of ``model.json``; a model without it is the empty Geometry:
each member's own preprocessing, as before). Three stages:

1. **the working image**: each image is resized to ``image_size``; or resized to ``resize`` and
   centre-cropped to ``center_crop`` (the PatchCore paper's 256 -> 224); with ``keep_aspect``,
   ``image_size`` is the shorter side and the longer one follows the training images' aspect
   ratio (decided at fit from the first training image, rounded to a multiple of
   :data:`SIZE_MULTIPLE`, never below the shorter side); an image whose aspect ratio gives
   another working size is refused with a clear error. With tiles and none of these, the
   working image is the image at the training images' resolution (the first training image's
   size, ``fit_size``; an image of another size is resized to it). Without any option the
   members keep their own preprocessing (the backbone's pretrained size).
2. **network inputs**: without tiles the working image itself (every member's preprocessing
   size becomes the working size); with ``tile`` the working image is cut into ``tile`` x
   ``tile`` tiles (:class:`TileLayout`: ``tile_stride`` apart, default ``tile``, i.e. no
   overlap; the last row and column of tiles aligned to the border, so they overlap their
   neighbours unless the size is a multiple of the stride). Tiles are what the detectors fit
   on and score; normalisation is the member's own.
3. **stitching** (tiles only): each tile's grid map is upsampled bilinearly to the tile and
   the tiles are blended into one map of the working image, overlaps averaged with the
   weights of a Hann window (``sin^2``, highest in the tile's centre, near 0 at its edges), so
   the blend changes continuously where tiles begin and end: no seams. Upsampling, weighting
   and placement are linear and separable, so a whole stitch is two matrix products
   (:func:`stitch_operator`; constants in an ONNX graph). The image score is the maximum of the
   stitched map (detectors without maps: the maximum of their tile scores). The usual
   post-processing (Gaussian blur at the working size, resize to the original size) then
   applies to the stitched map.

Plain torch and NumPy; no I/O. :mod:`vad.model`, :mod:`vad.export` and :mod:`vad.build` use it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vad.contracts import Prediction, Preprocessing
from vad.errors import VadError

#: ``keep_aspect``: the longer side is rounded to a multiple of this (the deepest feature stride
#: of the shipped backbones: EfficientNet and ResNet stages end at stride 32).
SIZE_MULTIPLE = 32

Size = tuple[int, int]


def parse_size(value: Any, flag: str) -> Size | None:
    """``(H, W)`` from None, a number, ``"H,W"`` / ``"HxW"`` text or a list of one or two
    numbers; one number is a square. Anything else is a clear error naming ``flag``."""
    if value is None:
        return None
    if isinstance(value, bool):
        numbers: list[Any] = []
    elif isinstance(value, int):
        numbers = [value]
    elif isinstance(value, str):
        try:
            numbers = [int(part) for part in value.lower().replace("x", ",").split(",") if part.strip()]
        except ValueError:
            numbers = []
    elif isinstance(value, (list, tuple)):
        numbers = list(value)
    else:
        numbers = []
    if len(numbers) == 1:
        numbers *= 2
    if len(numbers) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in numbers):
        raise VadError(f"{flag} expects HEIGHT[,WIDTH] in pixels (one number: a square), e.g. 320 or 256,320; got {value!r}")
    return int(numbers[0]), int(numbers[1])


def keep_aspect_size(short: int, image_size: Size, multiple: int = SIZE_MULTIPLE) -> Size:
    """The working size of an image of ``image_size`` whose shorter side becomes ``short``: the
    longer side follows the aspect ratio, rounded to a multiple of ``multiple`` (at least ``short``)."""
    height, width = image_size
    longer = max(short, int(math.floor(short * max(height, width) / min(height, width) / multiple + 0.5)) * multiple)
    return (short, longer) if height <= width else (longer, short)


def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
    """Where tiles of ``tile`` pixels start along an axis of ``length``: every ``stride`` pixels,
    the last one aligned to the end, so the tiles cover the axis completely."""
    if not 1 <= tile <= length or stride < 1:
        raise VadError(f"tiles of {tile} px with stride {stride} do not fit an image side of {length} px")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return tuple(starts)


def blend_window(tile: int) -> np.ndarray:
    """The blending weight of each of a tile's ``tile`` pixels along an axis (float64): a Hann
    window ``sin^2(pi (t + 0.5) / tile)``, positive everywhere, near 0 at both edges."""
    return np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2


@functools.lru_cache(maxsize=64)
def stitch_operator(length: int, tile: int, stride: int, grid: int) -> np.ndarray:
    """``[length, tiles * grid]`` float64: along one axis, the tiles' ``grid``-sample maps
    (concatenated) upsampled bilinearly to ``tile`` pixels, weighted by :func:`blend_window`,
    placed at their starts and divided by the summed weights. Cached; read-only."""
    from vad.postprocess import bilinear_matrix

    starts = tile_starts(length, tile, stride)
    weights = blend_window(tile)
    total = np.zeros(length)
    for start in starts:
        total[start : start + tile] += weights
    upsample = bilinear_matrix(grid, tile)  # [tile, grid]
    operator = np.zeros((length, len(starts) * grid))
    for index, start in enumerate(starts):
        share = weights / total[start : start + tile]  # 1 where only this tile covers
        operator[start : start + tile, index * grid : (index + 1) * grid] = share[:, None] * upsample
    operator.flags.writeable = False
    return operator


@dataclass(frozen=True)
class TileLayout:
    """The tiles of a working image of ``size`` (``(H, W)``): ``tile`` px squares ``stride`` apart,
    in row-major order (the order the detectors see them, image after image)."""

    size: Size
    tile: int
    stride: int

    @property
    def rows(self) -> tuple[int, ...]:
        """Top edges of the tile rows."""
        return tile_starts(self.size[0], self.tile, self.stride)

    @property
    def cols(self) -> tuple[int, ...]:
        """Left edges of the tile columns."""
        return tile_starts(self.size[1], self.tile, self.stride)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """``(top, left)`` of every tile, row-major."""
        return [(top, left) for top in self.rows for left in self.cols]

    @property
    def count(self) -> int:
        """Tiles per image."""
        return len(self.rows) * len(self.cols)

    @property
    def overlapping(self) -> bool:
        """True when some tiles share pixels (a stride below the tile, or the border-aligned
        last row or column)."""
        return any(b - a < self.tile for starts in (self.rows, self.cols) for a, b in zip(starts, starts[1:]))

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B * count, C, tile, tile]`` (image-major, tiles row-major);
        static slices, so an ONNX trace holds them as constants."""
        if tuple(images.shape[-2:]) != tuple(self.size):
            raise VadError(f"tiling expects {self.size[0]}x{self.size[1]} images, got {tuple(images.shape[-2:])}")
        t = self.tile
        tiles = torch.stack([images[:, :, top : top + t, left : left + t] for top, left in self.positions], dim=1)
        return tiles.reshape(-1, images.shape[1], t, t)

    def stitch(self, maps: torch.Tensor) -> torch.Tensor:
        """Tile grid maps ``[B * count, h, w]`` -> one blended map ``[B, H, W]`` per image: the
        tiles arranged as a mosaic ``[B, rows * h, cols * w]`` and multiplied by the
        :func:`stitch_operator` of each axis (upsampling, weights, placement, normalisation)."""
        h, w = int(maps.shape[-2]), int(maps.shape[-1])
        ny, nx = len(self.rows), len(self.cols)
        mosaic = maps.reshape(-1, ny, nx, h, w).permute(0, 1, 3, 2, 4).reshape(-1, ny * h, nx * w)
        rows, cols = (
            torch.tensor(stitch_operator(length, self.tile, self.stride, grid), dtype=maps.dtype, device=maps.device)
            for length, grid in ((self.size[0], h), (self.size[1], w))
        )
        return torch.matmul(torch.matmul(rows, mosaic), cols.T)

    def image_prediction(self, prediction: Prediction) -> Prediction:
        """Per-tile predictions (``[B * count]`` scores, ``[B * count, h, w]`` maps or None) ->
        per-image: the stitched map and its maximum as the score; without maps, the maximum of
        the image's tile scores."""
        if prediction.maps is None:
            return Prediction(prediction.scores.float().reshape(-1, self.count).amax(dim=1), None)
        stitched = self.stitch(prediction.maps.float())
        return Prediction(stitched.amax(dim=(1, 2)), stitched)


@dataclass(frozen=True)
class Geometry:
    """How images become network inputs (module docstring). Build with :meth:`create` (which
    validates); ``fit_size`` is set by :meth:`resolved` at fit."""

    image_size: Size | None = None
    resize: Size | None = None
    center_crop: Size | None = None
    keep_aspect: bool = False
    tile: int | None = None
    tile_stride: int | None = None
    #: The first training image's ``(H, W)``: the working size of tiles at the original
    #: resolution, and the aspect ratio ``keep_aspect`` follows.
    fit_size: Size | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        image_size: Any = None,
        resize: Any = None,
        center_crop: Any = None,
        keep_aspect: bool = False,
        tile: Any = None,
        tile_stride: Any = None,
        fit_size: Any = None,
    ) -> Geometry:
        """A validated Geometry from user values (sizes as numbers, ``"H,W"`` or lists); every
        inconsistency is a :class:`VadError` naming the options."""
        image_size = parse_size(image_size, "--image-size")
        resize = parse_size(resize, "--resize")
        center_crop = parse_size(center_crop, "--center-crop")
        fit_size = parse_size(fit_size, "fit_size")
        for value, flag in ((tile, "--tile"), (tile_stride, "--tile-stride")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise VadError(f"{flag} expects a whole number of pixels >= 1, got {value!r}")
        if not isinstance(keep_aspect, bool):
            raise VadError(f"keep_aspect must be true or false, got {keep_aspect!r}")
        if center_crop is not None and resize is None:
            raise VadError("--center-crop needs --resize (resize first, then crop the centre), e.g. --resize 256 --center-crop 224")
        if resize is not None and center_crop is None:
            raise VadError("--resize goes with --center-crop (e.g. --resize 256 --center-crop 224); for a plain resize use --image-size")
        if resize is not None and center_crop is not None and (center_crop[0] > resize[0] or center_crop[1] > resize[1]):
            raise VadError(f"--center-crop {center_crop[0]},{center_crop[1]} is larger than --resize {resize[0]},{resize[1]}: the crop must fit inside the resized image")
        if image_size is not None and resize is not None:
            raise VadError("--image-size and --resize/--center-crop both set the network input size; use one of them")
        if keep_aspect:
            if image_size is None:
                raise VadError("--keep-aspect needs --image-size S (the shorter side; the longer follows the training images' aspect ratio)")
            if image_size[0] != image_size[1]:
                raise VadError(f"--keep-aspect takes --image-size as one number, the shorter side; got {image_size[0]},{image_size[1]}")
        if tile_stride is not None and tile is None:
            raise VadError("--tile-stride needs --tile SIZE")
        if tile is not None and tile_stride is not None and tile_stride > tile:
            raise VadError(f"--tile-stride {tile_stride} is larger than --tile {tile}: the tiles would leave gaps; use a stride <= the tile size")
        geometry = cls(image_size, resize, center_crop, keep_aspect, tile, tile_stride, fit_size)
        if tile is not None:
            fixed = center_crop or (image_size if not keep_aspect else None)
            if fixed is not None and tile > min(fixed):
                raise VadError(f"--tile {tile} is larger than the {fixed[0]}x{fixed[1]} image it tiles; use a tile of at most {min(fixed)} px")
            if keep_aspect and image_size is not None and tile > image_size[0]:
                raise VadError(f"--tile {tile} is larger than the shorter side {image_size[0]} (--image-size with --keep-aspect)")
        return geometry.resolved(fit_size) if fit_size is not None else geometry

    def resolved(self, image_size: Size) -> Geometry:
        """This geometry with ``fit_size`` decided from the first training image's ``(H, W)``
        (kept when already set); checks that the tiles fit the working image."""
        if not self.active:
            return self
        resolved = self if self.fit_size is not None else dataclasses.replace(self, fit_size=(int(image_size[0]), int(image_size[1])))
        working = resolved.working_size
        assert working is not None
        if self.tile is not None and self.tile > min(working):
            raise VadError(
                f"--tile {self.tile} is larger than the {working[0]}x{working[1]} working image (the training images' "
                f"{'resolution' if self.image_size is None else 'size'}); use a tile of at most {min(working)} px"
            )
        return resolved

    # ------------------------------------------------------------------ facts

    @property
    def active(self) -> bool:
        """False for the empty geometry (each member's own preprocessing, as before)."""
        return self.image_size is not None or self.resize is not None or self.tile is not None

    @property
    def tiled(self) -> bool:
        """True when the detectors see tiles."""
        return self.tile is not None

    @property
    def stride(self) -> int | None:
        """The tile stride (default: the tile, no overlap), or None without tiles."""
        return None if self.tile is None else (self.tile_stride or self.tile)

    @property
    def working_size(self) -> Size | None:
        """``(H, W)`` of the working image (what is tiled, or the network input without tiles);
        None for the empty geometry. A clear error when it is decided at fit and fit has not run."""
        if not self.active:
            return None
        if self.center_crop is not None:
            return self.center_crop
        if self.image_size is not None and not self.keep_aspect:
            return self.image_size
        if self.fit_size is None:
            raise VadError("the input geometry (--keep-aspect, or --tile at the images' own resolution) is decided at fit: fit the model first")
        if self.image_size is not None:
            return keep_aspect_size(self.image_size[0], self.fit_size)
        return self.fit_size

    @property
    def planned_network_size(self) -> Size | None:
        """The network input size as far as it is known before fit (None: the member's own, or
        decided at fit)."""
        if self.tile is not None:
            return (self.tile, self.tile)
        if self.center_crop is not None:
            return self.center_crop
        if self.image_size is not None and not self.keep_aspect:
            return self.image_size
        return None

    @property
    def overlapping(self) -> bool:
        """True when tiles share pixels; before fit (working size unknown) whenever the stride
        is below the tile."""
        if self.tile is None:
            return False
        try:
            working = self.working_size
        except VadError:
            return (self.stride or 0) < self.tile
        assert working is not None
        return TileLayout(working, self.tile, self.stride or self.tile).overlapping

    def layout(self) -> TileLayout | None:
        """The tiles of the working image (None without tiles)."""
        if self.tile is None:
            return None
        working = self.working_size
        assert working is not None
        return TileLayout(working, self.tile, self.stride or self.tile)

    def preprocessing(self, native: Preprocessing) -> Preprocessing:
        """A member's preprocessing with this geometry: ``size`` is the working size (resize and
        crop as set); normalisation and interpolation stay the member's. The member's own
        preprocessing for the empty geometry."""
        if not self.active:
            return native
        working = self.working_size
        assert working is not None
        if self.center_crop is not None:
            return dataclasses.replace(native, size=working, resize=self.resize, crop=True)
        return dataclasses.replace(native, size=working, resize=None, crop=False)

    def check_image(self, image_size: Size, name: str = "an image") -> None:
        """Refuse an image whose aspect ratio gives another working size (``keep_aspect``)."""
        if not self.keep_aspect or self.image_size is None or self.fit_size is None:
            return
        expected = self.working_size
        got = keep_aspect_size(self.image_size[0], image_size)
        if got != expected:
            assert expected is not None
            raise VadError(
                f"{name} is {image_size[0]}x{image_size[1]} px: with --keep-aspect its aspect ratio gives a "
                f"{got[0]}x{got[1]} input, but the model works at {expected[0]}x{expected[1]} (from the training "
                f"images, {self.fit_size[0]}x{self.fit_size[1]}); give images of the training images' aspect "
                "ratio and orientation, or fit without --keep-aspect"
            )

    def describe(self) -> str:
        """One line for logs and reports."""
        if not self.active:
            return "each member's own input size"
        try:
            working = self.working_size
        except VadError:
            working = None
        parts = []
        if self.center_crop is not None:
            parts.append(f"resized to {self.resize[0]}x{self.resize[1]}, centre-cropped to {self.center_crop[0]}x{self.center_crop[1]}")  # type: ignore[index]
        elif self.image_size is not None:
            side = f"shorter side {self.image_size[0]}, aspect kept" if self.keep_aspect else "resized"
            parts.append(f"{side}: {working[0]}x{working[1]}" if working else side)
        elif working is not None:
            parts.append(f"at {working[0]}x{working[1]}")
        layout = None if working is None else self.layout()
        if self.tile is not None:
            count = f", {layout.count} per image" if layout else ""
            parts.append(f"tiles of {self.tile} px (stride {self.stride}{count})")
        return "; ".join(parts)

    # ------------------------------------------------------------------ model.json

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, for model.json (``working_size`` is informative, derived)."""
        data: dict[str, Any] = {
            "image_size": _listed(self.image_size),
            "resize": _listed(self.resize),
            "center_crop": _listed(self.center_crop),
            "keep_aspect": self.keep_aspect,
            "tile": self.tile,
            "tile_stride": self.tile_stride,
            "fit_size": _listed(self.fit_size),
        }
        try:
            data["working_size"] = _listed(self.working_size)
        except VadError:
            data["working_size"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Geometry:
        """Inverse of :meth:`to_dict`; None or ``{}`` (older model folders): the empty geometry."""
        if not data:
            return cls()
        return cls.create(
            image_size=data.get("image_size"),
            resize=data.get("resize"),
            center_crop=data.get("center_crop"),
            keep_aspect=bool(data.get("keep_aspect", False)),
            tile=data.get("tile"),
            tile_stride=data.get("tile_stride"),
            fit_size=data.get("fit_size"),
        )

    def same_choices(self, other: Geometry) -> bool:
        """True when both were asked for with the same options (``fit_size`` aside)."""
        return dataclasses.replace(self, fit_size=None) == dataclasses.replace(other, fit_size=None)


def _listed(size: Size | None) -> list[int] | None:
    return None if size is None else [int(size[0]), int(size[1])]


__all__ = ["SIZE_MULTIPLE", "Geometry", "TileLayout", "blend_window", "keep_aspect_size", "parse_size", "stitch_operator", "tile_starts"]
