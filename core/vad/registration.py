"""Image registration (seed 001, §A.4.2): every image aligned to a reference view before scoring.

An operator nudges a fixed camera and every part seems to have moved: registration maps each
image into the frame of a reference image of the consistent camera pose (the first training
image, or one given) with scikit-image:

* ``translation``: phase correlation of the grayscale images under a Hann window
  (``phase_cross_correlation``, 1/20 px; without the window the borders' wrap-around pulled
  the peak by up to 3 px on smooth 64 px scenes, with it the error stays below 0.2 px);
* ``rigid`` (rotation + translation) or ``affine``: ORB keypoints of the grayscale images
  (``keypoints`` per image), descriptors matched with a cross check and Lowe's ratio test
  (``ratio``), the transform fitted by RANSAC (``residual`` px inlier threshold).

An alignment fails, and says why, when RANSAC keeps fewer than ``min_inliers`` matches or the
aligned image covers less than ``min_overlap`` of the reference; such an image is scored as it
is, and the failure is listed with it (``scores.csv``, ``vad predict``), never hidden. The
aligned image is resampled bilinearly into the reference frame (where the camera saw nothing of
the reference view: the reference's own pixels, so the border does not look anomalous); the
anomaly map, computed in the reference frame, is resampled back into the image's own frame, so
maps and ground-truth masks stay in the frame of the file. The exported ONNX graph takes aligned
images: registration stays outside it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from vad.errors import VadError

KINDS = ("translation", "rigid", "affine")


@dataclass(frozen=True)
class Alignment:
    """How one image maps onto the reference: ``matrix`` (3x3, image ``(x, y, 1)`` -> reference),
    ``overlap`` (share of the reference the image covers), ``error`` (why it failed, or None)."""

    matrix: np.ndarray
    overlap: float
    error: str | None = None


def gray(image: np.ndarray) -> np.ndarray:
    """Float grayscale ``[H, W]`` in [0, 1] of an RGB uint8 image."""
    return image.astype(np.float64).mean(axis=2) / 255.0


def _warp(values: np.ndarray, to_output: np.ndarray, shape: tuple[int, int], fill: float) -> np.ndarray:
    """``values`` resampled (bilinear) onto an output grid of ``shape`` whose pixel ``p`` reads
    ``values`` at ``inverse(to_output) p``."""
    from skimage.transform import ProjectiveTransform, warp

    return warp(values, ProjectiveTransform(np.linalg.inv(to_output)), output_shape=shape, order=1, mode="constant", cval=fill, preserve_range=True)


@dataclass(frozen=True, eq=False)
class Registration:
    """Aligns images to ``reference`` (RGB uint8) by ``kind``; see the module docstring."""

    reference: np.ndarray
    kind: str = "translation"
    keypoints: int = 500
    ratio: float = 0.8
    residual: float = 2.0
    min_inliers: int = 10
    min_overlap: float = 0.8

    def __post_init__(self) -> None:
        import importlib.util

        if importlib.util.find_spec("skimage") is None:
            raise VadError("image registration needs scikit-image: pip install 'vad-core[registration]'")
        if self.kind not in KINDS:
            raise VadError(f"registration must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.reference.ndim != 3 or self.reference.shape[2] != 3:
            raise VadError(f"the registration reference must be an RGB image, got shape {self.reference.shape}")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.reference.shape[0]), int(self.reference.shape[1])

    @functools.cached_property
    def _windowed_reference(self) -> tuple[np.ndarray, np.ndarray]:
        """The Hann window of the reference's size and the reference's grayscale under it (once
        per registration, not per image)."""
        from skimage.filters import window

        hann = window("hann", self.size)  # tapers the borders, whose wrap-around biases the peak
        return hann, gray(self.reference) * hann

    @functools.cached_property
    def _reference_features(self) -> tuple[np.ndarray, np.ndarray] | str:
        """The reference's ORB keypoints and descriptors (once per registration), or why not."""
        return self._orb(gray(self.reference))

    def _orb(self, picture: np.ndarray) -> tuple[np.ndarray, np.ndarray] | str:
        """ORB keypoints ``(x, y)`` and descriptors of a grayscale image, or why there are none."""
        from skimage.feature import ORB

        orb = ORB(n_keypoints=self.keypoints)
        try:
            orb.detect_and_extract(picture)
        except RuntimeError as error:  # no keypoints at all (a flat image)
            return f"no ORB keypoints found ({error})"
        return orb.keypoints[:, ::-1], orb.descriptors

    def estimate(self, image: np.ndarray) -> Alignment:
        """The alignment of one RGB uint8 image (its failure reason when it has one)."""
        moving = gray(image)
        if self.kind == "translation":
            from skimage.registration import phase_cross_correlation

            if moving.shape != self.size:
                return Alignment(np.eye(3), 0.0, f"translation needs the reference's size {self.size}, got {moving.shape}")
            hann, fixed = self._windowed_reference
            shift, _, _ = phase_cross_correlation(fixed, moving * hann, upsample_factor=20)
            matrix = np.array([[1.0, 0.0, shift[1]], [0.0, 1.0, shift[0]], [0.0, 0.0, 1.0]])
        else:
            matrix, error = self._feature_matrix(moving)
            if error is not None:
                return Alignment(np.eye(3), 0.0, error)
        covered = _warp(np.ones(moving.shape), matrix, self.size, 0.0)
        overlap = float((covered > 0.5).mean())
        if overlap < self.min_overlap:
            return Alignment(matrix, overlap, f"the aligned image covers {overlap:.0%} of the reference, less than {self.min_overlap:.0%}")
        return Alignment(matrix, overlap)

    def _feature_matrix(self, moving: np.ndarray) -> tuple[np.ndarray, str | None]:
        from skimage.feature import match_descriptors
        from skimage.measure import ransac
        from skimage.transform import AffineTransform, EuclideanTransform

        found = [self._orb(moving), self._reference_features]
        for features in found:
            if isinstance(features, str):
                return np.eye(3), features
        (moving_xy, moving_descriptors), (fixed_xy, fixed_descriptors) = found
        matches = match_descriptors(moving_descriptors, fixed_descriptors, cross_check=True, max_ratio=self.ratio)
        if len(matches) < self.min_inliers:
            return np.eye(3), f"{len(matches)} keypoint matches, fewer than {self.min_inliers}"
        model_class = EuclideanTransform if self.kind == "rigid" else AffineTransform
        model, inliers = ransac(
            (moving_xy[matches[:, 0]], fixed_xy[matches[:, 1]]), model_class, min_samples=3 if self.kind == "affine" else 2,
            residual_threshold=self.residual, max_trials=2000, rng=0,
        )
        count = 0 if inliers is None else int(inliers.sum())
        if model is None or count < self.min_inliers:
            return np.eye(3), f"{count} RANSAC inliers, fewer than {self.min_inliers}"
        return np.asarray(model.params, dtype=np.float64), None

    def check_image(self, shape: tuple[int, ...], path: str) -> None:
        """Refuse an image whose size is not the reference's (the same camera takes every image)."""
        if tuple(shape[:2]) != self.size:
            raise VadError(
                f"{path} is {shape[0]}x{shape[1]} px (HxW) but the registration reference is {self.size[0]}x{self.size[1]}; "
                "every image of a registered view must come from that camera at that size"
            )

    def align(self, image: np.ndarray) -> tuple[np.ndarray, Alignment]:
        """The image in the reference frame (uint8) and its alignment; a failed alignment
        returns the image unchanged (identity), its ``error`` saying why."""
        alignment = self.estimate(image)
        if alignment.error is not None:
            return image, Alignment(np.eye(3), alignment.overlap, alignment.error)
        matrix = alignment.matrix
        channels = [_warp(image[..., c].astype(np.float64), matrix, self.size, np.nan) for c in range(3)]
        warped = np.stack(channels, axis=2)
        # Where the camera saw nothing of the reference view, the reference itself: no part can be
        # inspected there, and black borders would look anomalous.
        warped = np.where(np.isnan(warped), self.reference, warped)
        aligned = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
        return aligned, alignment

    def to_original(self, anomaly_map: np.ndarray, alignment: Alignment, shape: tuple[int, int]) -> np.ndarray:
        """A map in the reference frame resampled into the frame of the image it was aligned
        from (``shape``); where the image saw nothing of the reference, the map's minimum."""
        return _warp(anomaly_map.astype(np.float64), np.linalg.inv(alignment.matrix), shape, float(anomaly_map.min())).astype(np.float32)

    # ------------------------------------------------------------------ state

    def to_document(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """model.json's ``registration`` entry and its tensor (the reference image)."""
        import torch

        entry = {
            "kind": self.kind, "keypoints": self.keypoints, "ratio": self.ratio, "residual": self.residual,
            "min_inliers": self.min_inliers, "min_overlap": self.min_overlap, "size": list(self.size),
        }
        return entry, {"registration.reference": torch.from_numpy(np.ascontiguousarray(self.reference))}

    @classmethod
    def from_document(cls, entry: dict[str, Any] | None, tensors: dict[str, Any]) -> Registration | None:
        """The saved registration, or None; a clear error when it is damaged."""
        if not entry:
            return None
        if "registration.reference" not in tensors:
            raise VadError("the saved model has a registration entry but no registration.reference tensor; refit the model")
        reference = tensors["registration.reference"].cpu().numpy().astype(np.uint8)
        if list(reference.shape[:2]) != list(entry.get("size", [])):
            raise VadError(f"the saved registration reference is {list(reference.shape[:2])} but model.json says {entry.get('size')}; refit the model")
        options = {key: entry[key] for key in ("kind", "keypoints", "ratio", "residual", "min_inliers", "min_overlap") if key in entry}
        return cls(reference, **options)
