"""Regions of interest (seed 001): the part of a fixed camera's view that is inspected.

On a line-clearance camera, parts of every view are irrelevant or move on their own (cables,
conveyor belts, a robot arm). A region of interest (ROI) is a binary mask in the frame of the
training images (every image of the category must have that size: the camera is fixed), given
as a PNG (non-zero = inspected) or as polygons of ``[x, y]`` pixel vertices. Two modes, as seed
001 compares them:

* ``before`` (seed 001's PRE): pixels outside the ROI are painted ``fill`` (black by default) in
  every decoded image before any detector sees it -- training, calibration and test images
  alike -- so what moves there cannot look anomalous; a detector that can
  (``Detector.exclude_from_training``: PatchCore leaves the patches outside out of its memory
  bank) also learns nothing from there. Works for image-level detectors too.
* ``after`` (PO): the detector sees the whole image as it is. Needs a detector with maps.

With anomaly maps, in both modes the image score is the maximum of the map *inside* the ROI at
the working size (after upsampling and blur: the same map ``vad export`` computes), and the map
returned at each image's size holds, outside the ROI, its smallest value inside; the detector's
own image score (PatchCore's re-weighting, a flow's mean) is replaced by that maximum.

Either way pixel metrics are computed inside the ROI only (ground-truth pixels outside it are
ignored, anomalous or not), and the mode, fill and mask are saved with the model, so ``vad
predict`` and ``vad export`` apply the same ROI (the exported graph paints or restricts with the
mask as a constant). Tiles are not supported with an ROI.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vad.contracts import Preprocessing
from vad.errors import VadError

MODES = ("before", "after")


def inside_polygon(points: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Bool ``[N]``: which ``points [N, 2]`` lie inside the polygon ``vertices [V, 2]`` (even-odd
    rule: a ray to the right crosses the boundary an odd number of times)."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    straddles = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing_x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return np.count_nonzero(straddles & (x < crossing_x), axis=1) % 2 == 1


def polygon_mask(polygons: Any, size: tuple[int, int]) -> np.ndarray:
    """Bool ``[H, W]``: pixels whose centre lies inside any of ``polygons`` (each a list of at
    least three ``[x, y]`` vertices in pixels, x to the right, y down)."""
    if not isinstance(polygons, list) or not polygons:
        raise VadError(f"an ROI given as polygons needs a non-empty list of polygons, each a list of [x, y] vertices; got {polygons!r}")
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width]
    centres = np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
    mask = np.zeros(height * width, bool)
    for index, polygon in enumerate(polygons):
        try:
            vertices = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError):
            vertices = np.zeros((0, 0))
        if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3 or not np.isfinite(vertices).all():
            raise VadError(f"ROI polygon {index} must be a list of at least three [x, y] pixel vertices, got {polygon!r}")
        mask |= inside_polygon(centres, vertices)
    return mask.reshape(height, width)


def read_roi_mask(spec: Any, size: tuple[int, int], where: str) -> np.ndarray:
    """The ROI ``spec`` (a PNG path or polygons) as a bool mask of ``size`` (the training images'
    ``(H, W)``); a clear error naming ``where`` (the category) for anything else."""
    if isinstance(spec, (str, Path)):
        from vad.images import read_mask

        path = Path(spec)
        if not path.is_file():
            raise VadError(f"ROI for {where}: no mask file {path}")
        mask = np.asarray(read_mask(str(path)), bool)
        if mask.shape != tuple(size):
            raise VadError(f"ROI for {where}: {path} is {mask.shape[0]}x{mask.shape[1]} px (HxW) but the training images are {size[0]}x{size[1]}")
    else:
        mask = polygon_mask(spec, size)
    if not mask.any():
        raise VadError(f"ROI for {where} is empty: no pixel would be inspected")
    return mask


@dataclass(frozen=True, eq=False)
class Roi:
    """A fitted region of interest: ``mask`` bool ``[H, W]`` in the training images' frame."""

    mask: np.ndarray
    mode: str = "after"
    fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise VadError(f"ROI mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if len(self.fill) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in self.fill):
            raise VadError(f"ROI fill must be three 8-bit values [R, G, B], got {self.fill!r}")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def check_image(self, shape: tuple[int, ...], path: str) -> None:
        """Refuse an image whose size is not the ROI's (the camera must be fixed)."""
        if tuple(shape[:2]) != self.size:
            raise VadError(
                f"{path} is {shape[0]}x{shape[1]} px (HxW) but the region of interest was set on {self.size[0]}x{self.size[1]} "
                "training images; every image of a view with an ROI must have its size"
            )

    def paint(self, image: np.ndarray) -> np.ndarray:
        """``before`` mode: a copy of the RGB uint8 ``image`` with the pixels outside the ROI set to ``fill``."""
        painted = image.copy()
        painted[~self.mask] = np.asarray(self.fill, dtype=image.dtype)
        return painted

    @functools.cached_property
    def _working_masks(self) -> dict[tuple[Preprocessing, str], torch.Tensor]:
        """:meth:`working_mask` by preprocessing and device: made once, read by every batch."""
        return {}

    def working_mask(self, preprocessing: Preprocessing, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool ``[h, w]``: the ROI at the working size, resized and cropped as the images are
        (a working pixel is inside when at least half of what it covers is)."""
        key = (preprocessing, str(device))
        if key not in self._working_masks:
            self._working_masks[key] = self._resized(preprocessing, device)
        return self._working_masks[key]

    def _resized(self, preprocessing: Preprocessing, device: torch.device | str) -> torch.Tensor:
        from vad.preprocess import center_crop, resize_batch

        mask = torch.from_numpy(self.mask.astype(np.float32))[None, None].to(device)
        mask = resize_batch(mask, tuple(preprocessing.resize or preprocessing.size), "bilinear")
        if preprocessing.crop:
            mask = center_crop(mask, tuple(preprocessing.size))
        inside = mask[0, 0] >= 0.5
        if not inside.any():
            raise VadError(f"the region of interest vanishes at the working size {preprocessing.size}: enlarge it or the input size")
        return inside

    def restrict(self, working_maps: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """``after`` mode: image scores ``[B]``, the maximum of ``working_maps [B, h, w]`` inside."""
        return working_maps.masked_fill(~inside, float("-inf")).amax(dim=(-2, -1))

    def fill_outside(self, anomaly_map: np.ndarray) -> np.ndarray:
        """``after`` mode: the map at the image's size with its smallest value inside the ROI outside it."""
        inside = self.mask
        filled = anomaly_map.copy()
        filled[~inside] = anomaly_map[inside].min()
        return filled

    # ------------------------------------------------------------------ state

    def to_document(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """model.json's ``roi`` entry and its tensor."""
        return {"mode": self.mode, "fill": list(self.fill), "size": list(self.size)}, {"roi.mask": torch.from_numpy(self.mask.astype(np.uint8))}

    @classmethod
    def from_document(cls, entry: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> Roi | None:
        """The saved ROI, or None when the model has none; a clear error when it is damaged."""
        if not entry:
            return None
        if "roi.mask" not in tensors:
            raise VadError("the saved model has an ROI entry but no roi.mask tensor; refit the model")
        mask = tensors["roi.mask"].cpu().numpy().astype(bool)
        if list(mask.shape) != list(entry.get("size", [])):
            raise VadError(f"the saved ROI mask is {list(mask.shape)} but model.json says {entry.get('size')}; refit the model")
        return cls(mask, str(entry.get("mode")), tuple(int(v) for v in entry.get("fill", (0, 0, 0))))
