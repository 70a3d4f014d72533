#!/usr/bin/env python
"""A nanofibre-like texture with low-contrast structural defects, in the MVTec AD layout.

    python benchmarks/fibre_data.py OUT_DIR [--train 60] [--test-good 20] [--test-defects 30] [--size 128]

The case where Bergmann et al. (VISAPP 2019; thesis ch. 3, NanoTWICE) found the SSIM autoencoder
far ahead of the L2 one: defects that change a texture's *structure* while its local luminance,
and partly its contrast, stay the same. One category, ``fibres``: many thin bright curved fibres
on a dark ground (gray, written as RGB PNGs), every image a new draw. Defects, with exact masks:

* ``clump``: inside a soft blob the fibres melt into a blur of the same local mean (structure and
  contrast lost, luminance kept);
* ``aligned``: inside an ellipse the fibres all run one way, mean and spread matched to what they
  replace (structure changed only);
* ``faint``: a blob shifted by half the texture's standard deviation (a low-contrast stain).

Masks are the blob's core (weight at least 0.5) for clumps and aligned patches, and the pixels
moved by at least 4 gray levels for faint stains. Everything comes from ``numpy.random.default_rng([seed, split, image])``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

SEED = 20261207
DEFECTS = ("clump", "aligned", "faint")
MARKER = "fibre_data.json"
#: Gray levels a defect must move a pixel by for the pixel to be in its mask.
CHANGE_THRESHOLD = 4.0


def fibres(rng: np.random.Generator, size: int, count: int | None = None, angle: float | None = None) -> np.ndarray:
    """``count`` (default: about one per px of side) anti-aliased bent fibres, bright on dark;
    all at ``angle`` (radians) when given, else each at its own; float32 gray."""
    from scipy import ndimage

    count = count or size
    canvas = np.zeros((size + 2, size + 2), np.float32)
    for _ in range(count):
        start = rng.uniform(-0.2 * size, 1.2 * size, 2)
        direction = angle + rng.normal(0, 0.05) if angle is not None else rng.uniform(0, np.pi)
        length = rng.uniform(0.5, 1.2) * size
        bend = rng.normal(0, 0.15) * length
        t = np.linspace(0, 1, int(4 * length))[:, None]
        line = np.array([np.sin(direction), np.cos(direction)])
        normal = np.array([np.cos(direction), -np.sin(direction)])
        points = start + t * length * line + (4 * t * (1 - t)) * bend * normal
        inside = (points >= 0).all(1) & (points < size).all(1)
        y, x = points[inside].T
        top, left = np.floor(y).astype(int), np.floor(x).astype(int)
        dy, dx = y - top, x - left
        brightness = rng.uniform(0.6, 1.0)
        for oy, ox, weight in ((0, 0, (1 - dy) * (1 - dx)), (1, 0, dy * (1 - dx)), (0, 1, (1 - dy) * dx), (1, 1, dy * dx)):
            np.add.at(canvas, (top + oy, left + ox), brightness * weight / 4)  # 4 samples per px
    canvas = ndimage.gaussian_filter(np.minimum(canvas[:size, :size], 1.5), 0.7)
    return (40.0 + 150.0 * canvas / max(float(canvas.max()), 1e-6) + rng.normal(0, 3.0, (size, size))).astype(np.float32)


def blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft blob weight map in [0, 1] of about a fifth of the side."""
    from scipy import ndimage

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = rng.uniform(0.3 * size, 0.7 * size, 2)
    radii = rng.uniform(0.08, 0.14, 2) * size
    inside = (((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1).astype(np.float32)
    weight = ndimage.gaussian_filter(inside, 2.0)
    return weight / max(float(weight.max()), 1e-6)


def defect(kind: str, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The damaged image and its boolean mask."""
    from scipy import ndimage

    size = image.shape[0]
    if kind == "clump":
        weight = blob(rng, size)
        after = image + weight * (ndimage.gaussian_filter(image, 3.0) - image)
        return after, weight >= 0.5
    if kind == "faint":
        weight = blob(rng, size)
        after = image + rng.choice([-1.0, 1.0]) * 0.5 * float(image.std()) * weight
        return after, np.abs(after - image) >= CHANGE_THRESHOLD
    if kind == "aligned":
        weight = blob(rng, size)
        inside = weight >= 0.5
        straight = fibres(rng, size, angle=rng.uniform(0, np.pi))
        matched = (straight - straight[inside].mean()) / max(float(straight[inside].std()), 1e-6) * image[inside].std() + image[inside].mean()
        after = image * (1 - weight) + matched * weight
        return after, inside
    raise ValueError(f"unknown defect {kind!r}; expected one of {DEFECTS}")


def _png(gray: np.ndarray, rgb: bool = True) -> bytes:
    """PNG bytes of a gray image: RGB (images, as MVTec's) or single-channel (masks)."""
    from PIL import Image

    buffer = io.BytesIO()
    value = np.clip(np.round(gray), 0, 255).astype(np.uint8)
    Image.fromarray(np.repeat(value[..., None], 3, -1) if rgb else value).save(buffer, format="PNG")
    return buffer.getvalue()


def build(root: str | Path, train: int = 60, test_good: int = 20, test_defects: int = 30, size: int = 128, seed: int = SEED) -> Path:
    """Write ``root/fibres`` (kept as it is when a build with the same arguments is there)."""
    root = Path(root)
    arguments = {"train": train, "test_good": test_good, "test_defects": test_defects, "size": size, "seed": seed}
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == arguments:
        return root
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{root} is not empty and holds no {MARKER}: give an empty or new folder")
    files: dict[str, bytes] = {}
    for number in range(train):
        files[f"fibres/train/good/{number:03d}.png"] = _png(fibres(np.random.default_rng([seed, 0, number]), size))
    for number in range(test_good):
        files[f"fibres/test/good/{number:03d}.png"] = _png(fibres(np.random.default_rng([seed, 1, number]), size))
    for number in range(test_defects):
        kind = DEFECTS[number % len(DEFECTS)]
        rng = np.random.default_rng([seed, 2, number])
        damaged, mask = defect(kind, fibres(rng, size), rng)
        name = f"{number // len(DEFECTS):03d}"
        files[f"fibres/test/{kind}/{name}.png"] = _png(damaged)
        files[f"fibres/ground_truth/{kind}/{name}_mask.png"] = _png(mask.astype(np.float32) * 255, rgb=False)
    if marker.is_file():
        marker.unlink()
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    marker.write_text(json.dumps(arguments, indent=1))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--test-good", type=int, default=20)
    parser.add_argument("--test-defects", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    build(args.root, args.train, args.test_good, args.test_defects, args.size, args.seed)
    print(f"{Path(args.root) / 'fibres'}: {args.train} train/good, {args.test_good} test/good, {args.test_defects} defective ({', '.join(DEFECTS)}); read it with: vad run --dataset mvtec --root {args.root}")


if __name__ == "__main__":
    sys.exit(main())
