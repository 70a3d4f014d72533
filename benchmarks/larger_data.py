#!/usr/bin/env python
"""A larger synthetic anomaly-detection data set in the MVTec AD layout, built in seconds.

    python benchmarks/larger_data.py OUT_DIR [--train 60] [--test-good 20] [--test-defects 30]
    vad run --dataset mvtec --root OUT_DIR ...

Five categories, each with ``train`` good training images, ``test_good`` good test images and
``test_defects`` defective test images (split evenly over three defect types) with exact masks,
RGB PNGs of ``size`` x ``size`` px (default 224, the input of EfficientNet-Lite0):

* ``brick``, ``grass``, ``gravel``: crops of scikit-image's CC0 textures (512 x 512 gray), with
  scale (crop side 192-224 px, resized), flip and lighting jitter. Training crops come from the
  top 288 rows, test crops from the bottom 224 rows, so test images never copy training pixels.
  Defects: ``scratch``, ``stain``, ``foreign_patch`` of :mod:`vad_datasets.synth` (the demo's).
* ``stone``: a procedural cobblestone texture (Voronoi cells of a jittered grid with per-stone tone and bulge,
  dark joints, multi-scale noise); every image is a new draw. Same three defects.
* ``gear``: an OBJECT, a rendered metal gear-washer (14 teeth, centre hole) on a dark matte
  background with small pose (shift, rotation) and lighting jitter. Defects: ``scratch``
  (:func:`vad_datasets.synth.scratch` on the metal), ``chip`` (missing material at the rim) and
  ``spot`` (a foreign contamination blob on the metal).

Masks are exact: the pixels the defect changed by at least
:data:`vad_datasets.synth.CHANGE_THRESHOLD` gray levels (foreign patches: the pixels covered).
Everything is drawn from ``numpy.random.default_rng([seed, category, image])``: the same
bytes for the same arguments. The folder names are free: the ``mvtec`` data set takes any
folder under the root that has ``train/good`` as a category (``known_categories`` only feeds
suggestions), so these read with ``--dataset mvtec --root OUT_DIR``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

SEED = 20240623
CATEGORIES = ("brick", "grass", "gravel", "stone", "gear")
TEXTURE_DEFECTS = ("scratch", "stain", "foreign_patch")
OBJECT_DEFECTS = ("scratch", "chip", "spot")
#: RGB tint applied to each category's gray image.
TINTS = {
    "brick": (1.0, 0.84, 0.74),
    "grass": (0.8, 1.0, 0.7),
    "gravel": (0.96, 0.96, 1.0),
    "stone": (0.92, 0.9, 0.86),
    "gear": (0.94, 0.97, 1.0),
}
#: Share of each defect's change kept (the rest blended back to the clean image), so that no
#: category is trivially separable: scikit-image's brick and the procedural images are calmer
#: than grass and gravel, on which the demo's full-strength defects already overlap.
STRENGTH = {"brick": 0.45, "grass": 1.0, "gravel": 1.0, "stone": 0.45, "gear": 0.45}
#: The texture a category's foreign patches come from.
FOREIGN = {"brick": "gravel", "grass": "brick", "gravel": "grass", "stone": "gravel"}
#: Rows of the 512 x 512 scikit-image textures: [0, 288) training crops, [288, 512) test crops.
TRAIN_ROWS = 288
#: Written last into the root: what was built, so a rebuild with the same arguments is skipped.
MARKER = "larger_data.json"
#: Bump when the drawing code changes (a marker of another version triggers a rebuild).
VERSION = 1
#: Acquisition sessions, as real captures come: training images in file order are the first
#: third from session 0, the next from session 1, the last from session 2; test images cycle
#: through all three. Each session has its own lighting (``contrast`` about gray 128,
#: ``brightness``) and scale: texture crop ``sides`` (px, resized to the image size), ``stones``
#: per image side, the gear's ``light`` direction (radians).
SESSIONS = (
    {"contrast": 0.8, "brightness": -10.0, "sides": (208, 224), "stones": 5, "light": 0.3},
    {"contrast": 1.0, "brightness": 0.0, "sides": (200, 216), "stones": 6, "light": 0.8},
    {"contrast": 1.3, "brightness": 8.0, "sides": (192, 208), "stones": 7, "light": 1.3},
)


# --------------------------------------------------------------------------- textures


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if gray.shape == (size, size):
        return gray.astype(np.float32)
    return np.asarray(Image.fromarray(gray.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)


def relight(gray: np.ndarray, session: dict, rng: np.random.Generator) -> np.ndarray:
    """The session's contrast and brightness, with a little per-image jitter (affine, so it
    commutes with compositing layers)."""
    contrast = session["contrast"] * rng.uniform(0.96, 1.04)
    brightness = session["brightness"] + rng.uniform(-4.0, 4.0)
    return ((gray - 128.0) * contrast + 128.0 + brightness).astype(np.float32)


def _jittered_crop(texture: np.ndarray, rows: tuple[int, int], size: int, rng: np.random.Generator, sides: tuple[int, int] = (192, 224)) -> np.ndarray:
    """A square crop with a side in ``sides`` (scaled to ``size``) from ``rows`` of the texture,
    flipped at random; float32 gray."""
    limit = min(rows[1] - rows[0], texture.shape[1], sides[1])
    side = int(rng.integers(min(sides[0], limit), limit + 1))
    y = int(rng.integers(rows[0], rows[1] - side + 1))
    x = int(rng.integers(0, texture.shape[1] - side + 1))
    crop = texture[y : y + side, x : x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return _resize(np.ascontiguousarray(crop), size)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a ``cells`` x ``cells`` grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells + 3, cells + 3)).astype(np.float32)
    big = _resize(grid, size * (cells + 3) // cells)
    return big[:size, :size]


def stone_texture(rng: np.random.Generator, size: int, per_side: int = 6) -> np.ndarray:
    """A cobblestone surface of about ``per_side`` stones per side: Voronoi stones with their own
    tone and bulge, dark joints, multi-scale noise; float32 gray."""
    # jittered grid (plus a border ring): stones of similar size, no two seeds nearly coincide
    step = size / per_side
    grid = np.stack(np.meshgrid(np.arange(-1, per_side + 1), np.arange(-1, per_side + 1), indexing="ij"), -1).reshape(-1, 2)
    seeds = ((grid + 0.5 + rng.uniform(-0.35, 0.35, grid.shape)) * step).astype(np.float32)
    count = len(seeds)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    distances = np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1])
    nearest_two = np.partition(distances, 1, axis=2)[..., :2]
    cell = distances.argmin(axis=2)
    gap = nearest_two[..., 1] - nearest_two[..., 0]  # twice the distance to the joint
    tone = rng.normal(128.0, 16.0, count).astype(np.float32)[cell]
    bulge = 18.0 * np.clip(gap / 24.0, 0.0, 1.0) ** 0.5
    joint = np.clip((gap - 2.5) / 2.0, 0.0, 1.0)
    noise = sum(amplitude * _value_noise(rng, size, cells) for amplitude, cells in ((10.0, 6), (7.0, 14), (5.0, 36)))
    grain = rng.normal(0.0, 4.0, (size, size)).astype(np.float32)
    return ((tone + bulge + noise) * joint + 45.0 * (1.0 - joint) + grain).astype(np.float32)


# --------------------------------------------------------------------------- the object


def gear_layers(rng: np.random.Generator, size: int, session: dict = SESSIONS[1]) -> dict[str, np.ndarray]:
    """A metal gear-washer's ``coverage`` (anti-aliased, [0, 1]), ``metal`` shading and
    ``background``, each float32 ``[size, size]``; pose jittered, lit as in ``session``."""
    s = size / 224.0
    cy, cx = size / 2 + rng.uniform(-6, 6, 2) * s
    rotation = rng.uniform(-0.12, 0.12)
    teeth, outer, depth, hole = 14, 78.0 * s, 10.0 * s, 30.0 * s
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rho = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx)
    phase = np.mod((theta - rotation) * teeth / (2 * np.pi), 1.0)
    # trapezoid tooth profile: flat top on [0.3, 0.7] of a period, flanks of 0.12 period
    tooth = np.clip((0.32 - np.abs(phase - 0.5)) / 0.12, 0.0, 1.0)
    radius = outer + depth * tooth
    coverage = np.clip(radius - rho + 0.5, 0, 1) * np.clip(rho - hole + 0.5, 0, 1)
    light = session["light"] + rng.uniform(-0.15, 0.15)
    metal = (
        150.0
        + 32.0 * np.cos(theta - light) * np.clip(rho / outer, 0, 1)  # directional light on the face
        + 6.0 * np.sin(rho * 1.1 / s)  # concentric machining marks
        - 25.0 * np.clip((rho - outer + 2 * s) / (depth + 2 * s), 0, 1)  # darker chamfered teeth
        + rng.normal(0.0, 3.0, (size, size))
    )
    background = 48.0 + 7.0 * _value_noise(rng, size, 4) + rng.normal(0.0, 2.5, (size, size))
    contrast = session["contrast"] * rng.uniform(0.96, 1.04)  # relight() on both layers alike
    brightness = session["brightness"] + rng.uniform(-4.0, 4.0)
    metal, background = ((layer - 128.0) * contrast + 128.0 + brightness for layer in (metal, background))
    return {
        "coverage": coverage.astype(np.float32),
        "metal": np.clip(metal, 0, 255).astype(np.float32),
        "background": np.clip(background, 0, 255).astype(np.float32),
        "centre": np.array([cy, cx], np.float32),
        "radii": np.array([hole, outer], np.float32),
    }


def _compose(coverage: np.ndarray, metal: np.ndarray, background: np.ndarray) -> np.ndarray:
    return (background * (1 - coverage) + metal * coverage).astype(np.float32)


def _disc(size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.clip(radius - np.hypot(yy - centre[0], xx - centre[1]) + 0.5, 0, 1).astype(np.float32)


def gear_defect(kind: str, layers: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The defective gear image and its mask (pixels changed by >= CHANGE_THRESHOLD)."""
    from scipy import ndimage

    from vad_datasets.synth import CHANGE_THRESHOLD, scratch

    coverage, metal, background = layers["coverage"], layers["metal"], layers["background"]
    size = coverage.shape[0]
    clean = _compose(coverage, metal, background)
    hole, outer = (float(v) for v in layers["radii"])
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)], np.float32)
    if kind == "scratch":  # on the metal only (the curve may cross the hole or background)
        damaged = _compose(coverage, scratch(metal, rng)[0], background)
    elif kind == "chip":  # a bite out of the rim: background where there was metal
        centre = layers["centre"] + direction * (outer + rng.uniform(0.0, 6.0) * size / 224)
        bite = _disc(size, centre, rng.uniform(0.035, 0.055) * size)
        damaged = _compose(coverage * (1 - bite), metal, background)
    elif kind == "spot":  # a dark or bright foreign blob on the metal face
        centre = layers["centre"] + direction * rng.uniform(hole + 10 * size / 224, outer - 8 * size / 224)
        field = np.zeros((size, size), np.float32)
        for _ in range(3):
            offset = centre + rng.normal(0, 0.012 * size, 2)
            field += _disc(size, offset, rng.uniform(0.018, 0.035) * size)
        weight = ndimage.gaussian_filter(np.clip(field, 0, 1), sigma=1.2)
        tone = rng.choice([rng.uniform(55.0, 85.0), rng.uniform(215.0, 240.0)])
        texture = tone + rng.normal(0.0, 6.0, (size, size))
        damaged = _compose(coverage, metal * (1 - weight) + texture * weight, background)
    else:
        raise ValueError(f"unknown gear defect {kind!r}; expected one of {OBJECT_DEFECTS}")
    mask = np.abs(damaged - clean) >= CHANGE_THRESHOLD
    if kind == "spot":
        mask = ndimage.binary_fill_holes(mask)
    return np.clip(damaged, 0, 255).astype(np.float32), mask


# --------------------------------------------------------------------------- building


def soften(clean: np.ndarray, damaged: np.ndarray, mask: np.ndarray, kind: str, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep ``strength`` of a defect's change; the mask keeps the pixels still changed by at least
    CHANGE_THRESHOLD (holes filled, as the stain's), except a foreign patch's and a chip's
    (the pixels they cover, as at full strength)."""
    from scipy import ndimage

    from vad_datasets.synth import CHANGE_THRESHOLD

    if strength >= 1.0 or kind == "chip":
        return damaged, mask
    softened = (clean + strength * (damaged - clean)).astype(np.float32)
    if kind != "foreign_patch":
        mask = ndimage.binary_fill_holes(mask & (np.abs(softened - clean) >= CHANGE_THRESHOLD))
    return softened, mask


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _rgb(gray: np.ndarray, tint: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.round(gray[..., None] * np.asarray(tint, np.float32)), 0, 255).astype(np.uint8)


def _defect_types(count: int, kinds: tuple[str, ...]) -> list[str]:
    """``count`` defect kinds, as evenly spread as possible (the first kinds get the remainder)."""
    return [kinds[i % len(kinds)] for i in range(count)]


#: A defect whose mask covers fewer pixels than this (e.g. a scratch that missed the gear's
#: metal) is drawn again.
MIN_DEFECT_PIXELS = 25


def category_files(category: str, index: int, train: int, test_good: int, test_defects: int, size: int, seed: int) -> dict[str, bytes]:
    """Every file of one category as ``{relative path: PNG bytes}``."""
    from skimage import data

    from vad_datasets.synth import apply_defect

    tint = TINTS[category]
    files: dict[str, bytes] = {}
    textures = {name: np.asarray(getattr(data, name)(), np.float32) for name in ("brick", "grass", "gravel")}

    def rng_for(split: int, number: int) -> np.random.Generator:
        return np.random.default_rng([seed, index, split, number])

    def good(rng: np.random.Generator, split: str, session: dict) -> np.ndarray:
        if category == "stone":
            return relight(stone_texture(rng, size, session["stones"]), session, rng)
        if category == "gear":
            layers = gear_layers(rng, size, session)
            return _compose(layers["coverage"], layers["metal"], layers["background"])
        rows = (0, TRAIN_ROWS) if split == "train" else (TRAIN_ROWS, textures[category].shape[0])
        return relight(_jittered_crop(textures[category], rows, size, rng, session["sides"]), session, rng)

    def gray(image: np.ndarray) -> np.ndarray:
        return np.clip(image, 0, 255)

    for number in range(train):  # in file order, session by session
        session = SESSIONS[number * len(SESSIONS) // max(train, 1)]
        files[f"{category}/train/good/{number:03d}.png"] = _png(_rgb(gray(good(rng_for(0, number), "train", session)), tint))
    for number in range(test_good):
        session = SESSIONS[number % len(SESSIONS)]
        files[f"{category}/test/good/{number:03d}.png"] = _png(_rgb(gray(good(rng_for(1, number), "test", session)), tint))
    kinds = OBJECT_DEFECTS if category == "gear" else TEXTURE_DEFECTS
    counters = dict.fromkeys(kinds, 0)
    for number, kind in enumerate(_defect_types(test_defects, kinds)):
        session = SESSIONS[(number // len(kinds)) % len(SESSIONS)]  # every kind in every session
        rng = rng_for(2, number)
        while True:
            if category == "gear":
                layers = gear_layers(rng, size, session)
                clean = _compose(layers["coverage"], layers["metal"], layers["background"])
                damaged, mask = gear_defect(kind, layers, rng)
            else:
                clean = gray(good(rng, "test", session))
                foreign = gray(relight(_jittered_crop(textures[FOREIGN[category]], (0, 512), size, rng), session, rng))
                damaged, mask = apply_defect(kind, clean, foreign, rng)
            damaged, mask = soften(clean, damaged, mask, kind, STRENGTH[category])
            if mask.sum() >= MIN_DEFECT_PIXELS:
                break
        name = f"{counters[kind]:03d}"
        counters[kind] += 1
        files[f"{category}/test/{kind}/{name}.png"] = _png(_rgb(damaged, tint))
        files[f"{category}/ground_truth/{kind}/{name}_mask.png"] = _png(mask.astype(np.uint8) * 255)
    return files


def build(
    root: str | Path,
    train: int = 60,
    test_good: int = 20,
    test_defects: int = 30,
    size: int = 224,
    seed: int = SEED,
    categories: tuple[str, ...] = CATEGORIES,
) -> dict[str, dict[str, int]]:
    """Write the data set under ``root`` (MVTec AD layout); returns ``{category: {split: count}}``.

    A root that already holds a build with the same arguments is left as it is. A root that
    holds anything else but an earlier build of this generator is refused (nothing is deleted).
    """
    root = Path(root)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {CATEGORIES}")
    arguments = {"version": VERSION, "train": train, "test_good": test_good, "test_defects": test_defects,
                 "size": size, "seed": seed, "categories": list(categories)}
    summary = {c: {"train": train, "test_good": test_good, "test_defects": test_defects} for c in categories}
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == arguments:
            return summary
        for category in CATEGORIES:  # an earlier build of this generator: replace it
            shutil.rmtree(root / category, ignore_errors=True)
        marker.unlink()
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {MARKER}: give an empty or new folder")
    for index, category in enumerate(CATEGORIES):
        if category not in categories:
            continue
        for path, content in category_files(category, index, train, test_good, test_defects, size, seed).items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    (root / "LICENSE.txt").write_text(
        "Built by benchmarks/larger_data.py: crops of scikit-image's brick, grass and gravel textures (CC0, "
        "https://scikit-image.org/docs/stable/api/skimage.data.html) and procedural images; the defects are "
        "generated. Public domain (CC0).\n"
    )
    marker.write_text(json.dumps(arguments, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output folder (new or empty, or an earlier build to replace)")
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--test-good", type=int, default=20)
    parser.add_argument("--test-defects", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--category", action="append", choices=CATEGORIES, help="build only these (repeat)")
    args = parser.parse_args()
    import time

    start = time.perf_counter()
    summary = build(args.root, args.train, args.test_good, args.test_defects, args.size, args.seed,
                    tuple(args.category) if args.category else CATEGORIES)
    kinds = {c: OBJECT_DEFECTS if c == "gear" else TEXTURE_DEFECTS for c in summary}
    for category, counts in summary.items():
        print(f"{Path(args.root) / category}: {counts['train']} train/good, {counts['test_good']} test/good, "
              f"{counts['test_defects']} defective ({', '.join(kinds[category])}) with masks in ground_truth/; "
              f"{args.size}x{args.size} RGB PNG")
    print(f"built in {time.perf_counter() - start:.1f} s; read it with: vad run --dataset mvtec --root {args.root}")


if __name__ == "__main__":
    sys.exit(main())
