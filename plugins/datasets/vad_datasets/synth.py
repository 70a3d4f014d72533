"""Synthetic defects on gray texture crops (the numerical core of the demo data set; no I/O).

Each generator takes a float32 gray crop in [0, 255] and a NumPy ``Generator`` and returns the
defective crop and its exact mask: the pixels the defect changed by at least
``CHANGE_THRESHOLD`` gray levels (for the foreign patch: the pixels the patch covers).
Amplitudes are moderate on purpose: defects are visible to a person but overlap the texture's
own intensity range, so a good detector scores high but not perfectly.
"""

from __future__ import annotations

import numpy as np

#: Gray levels a pixel must change by to count as defective.
CHANGE_THRESHOLD = 10.0
#: Defect strengths are multiples of the crop's own contrast (its gray-level standard
#: deviation), so a stain is as visible on busy gravel as on calm brick.
SCRATCH_CONTRAST = (2.5, 3.5)
SCRATCH_WIDTH = (2.5, 4.0)
STAIN_CONTRAST = (1.6, 2.2)
#: Share of the texture's local contrast a stain washes out at its centre.
STAIN_FLATTEN = 0.6
PATCH_RADIUS = (0.12, 0.2)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.abs(after - before) >= CHANGE_THRESHOLD


def quadratic_curve(rng: np.random.Generator, size: int, points: int = 256) -> np.ndarray:
    """Points ``[N, 2]`` (y, x) along a random gently bent quadratic Bezier curve inside the crop."""
    margin = 0.12 * size
    start = rng.uniform(margin, size - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.3, 0.55) * size
    end = np.clip(start + length * np.array([np.sin(angle), np.cos(angle)]), 4, size - 5)
    normal = np.array([np.cos(angle), -np.sin(angle)])
    control = (start + end) / 2 + normal * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0.0, 1.0, points)[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin anti-aliased curved line, darker or brighter than the texture."""
    size = image.shape[0]
    curve = quadratic_curve(rng, size)
    width = rng.uniform(*SCRATCH_WIDTH)
    # Distance of every pixel near the curve to the densely sampled curve (sample spacing
    # < 0.3 px); pixels farther than the line's half width are untouched, so only a bounding
    # box around the curve is computed.
    reach = int(np.ceil(width / 2 + 1))
    top, left = np.maximum(np.floor(curve.min(axis=0)).astype(int) - reach, 0)
    bottom, right = np.minimum(np.ceil(curve.max(axis=0)).astype(int) + reach + 1, size)
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    distance = np.full(yy.shape, np.inf, dtype=np.float32)
    for y, x in curve:
        np.minimum(distance, np.hypot(yy - y, xx - x), out=distance)
    coverage = np.zeros(image.shape, dtype=np.float32)
    coverage[top:bottom, left:right] = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0)  # box-filter anti-aliasing
    sign = rng.choice([-1.0, 1.0])
    amplitude = rng.uniform(*SCRATCH_CONTRAST) * float(image.std())
    after = np.clip(image + sign * amplitude * coverage, 0, 255)
    return after.astype(np.float32), _changed(image, after)


def smooth_blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft irregular blob weight map in [0, 1] (sum of a few Gaussians, then blurred)."""
    from scipy import ndimage

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    center = rng.uniform(0.25 * size, 0.75 * size, 2)
    field = np.zeros((size, size), np.float32)
    for _ in range(3):
        offset = center + rng.normal(0, 0.05 * size, 2)
        sigma_y, sigma_x = rng.uniform(0.04, 0.09, 2) * size
        field += np.exp(-(((yy - offset[0]) / sigma_y) ** 2 + ((xx - offset[1]) / sigma_x) ** 2) / 2)
    blob = (field > 0.6).astype(np.float32)
    blob = ndimage.gaussian_filter(blob, sigma=2.5)
    return blob / max(float(blob.max()), 1e-6)


def stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blurred blob that shifts the intensity and washes out some texture (liquid, oil)."""
    from scipy import ndimage

    weight = smooth_blob(rng, image.shape[0])
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(*STAIN_CONTRAST) * float(image.std())
    smooth = ndimage.gaussian_filter(image, sigma=2.0)
    flattened = image + STAIN_FLATTEN * weight * (smooth - image)
    after = np.clip(flattened + shift * weight, 0, 255)
    # Where the shift and the washed-out texture happen to cancel, the pixel is still inside
    # the stain: fill such holes so the mask is the stain's area.
    return after.astype(np.float32), ndimage.binary_fill_holes(_changed(image, after))


def foreign_patch(image: np.ndarray, foreign: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rotated ellipse of another texture, brightness-matched to its surroundings, soft-edged."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
    ry, rx = rng.uniform(*PATCH_RADIUS, 2) * size
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dy * np.cos(theta) + dx * np.sin(theta)) / ry
    v = (-dy * np.sin(theta) + dx * np.cos(theta)) / rx
    radius = np.sqrt(u**2 + v**2)
    # About 1.5 px of soft edge, in units of the ellipse's mean radius.
    edge = 1.5 / ((ry + rx) / 2)
    alpha = np.clip((1.0 - radius) / edge + 0.5, 0.0, 1.0)
    inside = alpha >= 0.5
    # Match the patch's mean to the texture it replaces: the defect is its structure, not a
    # plain brightness change.
    matched = foreign - foreign[inside].mean() + image[inside].mean()
    after = np.clip(image * (1 - alpha) + matched * alpha, 0, 255)
    return after.astype(np.float32), inside


DEFECTS = ("scratch", "stain", "foreign_patch")


def apply_defect(kind: str, image: np.ndarray, foreign: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply the named defect (one of :data:`DEFECTS`)."""
    if kind == "scratch":
        return scratch(image, rng)
    if kind == "stain":
        return stain(image, rng)
    if kind == "foreign_patch":
        return foreign_patch(image, foreign, rng)
    raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")
