#!/usr/bin/env python
"""A generated data set in the MVTec LOCO AD layout, with structural and logical anomalies.

    python benchmarks/loco_data.py OUT_DIR [--train 60] [--validation 20] [--test-good 20]
                                           [--test-structural 20] [--test-logical 20] [--size 256]
    vad run --dataset mvtec-loco --root OUT_DIR --category pushpins ...

Built to compare Uninformed Students with GCAD (Bergmann's thesis, ch. 6-7) on the two kinds
of anomaly of MVTec LOCO AD:

* STRUCTURAL anomalies are local damage (a chipped part, a bruise, a crease, dirt, a colour
  never seen): a patch around the damage looks like nothing in the training images.
* LOGICAL anomalies break a global rule while every object in the image is drawn exactly like a
  normal one (same shape, colour, shading, texture; only where and how many differ): a missing
  or extra object, a mismatched pair, a wrong ratio. Objects sit at free positions, so a patch
  of a logical anomaly is mostly a patch that also occurs in normal images (a pin anywhere in
  its compartment, empty floor, a connector with three clamps, a blue cable, cereal at that
  height); a detector needs the image's global context (count, pairing, proportion) to see
  it. Some leave local traces, as in the real data set: a missing separator's wall ends, a
  mismatched cable's steeper slope, two pins nearer each other than pins of two compartments.

Three categories, every image a new draw with small pose jitter (shift, rotation up to 1.5
degrees, scale), lighting jitter (per-channel gain, brightness, a gentle gradient) and per-pixel
noise; ``size`` x ``size`` RGB PNG (default 256):

* ``pushpins``: a tray of 2 x 3 compartments, exactly one pushpin (a yellow disc head with
  shading and a highlight, a short steel needle in a random direction) per compartment at a
  free position (all of the compartment it fits in). Structural: ``broken_pushpin`` (a chipped
  bite out of a head), ``color`` (one head of a colour never seen: blue, red, green or white),
  ``contamination`` (a foreign blob: dark dirt, a blue plastic shred or white fluff).
  Logical: ``missing_pushpin`` (a compartment is empty; in a quarter of these images the pin
  sits in another compartment instead, which then also holds an ``additional_pushpin``
  region), ``additional_pushpin`` (two pins in one compartment), ``missing_separator`` (one
  inner wall segment between two compartments is absent).
* ``splicing_connectors``: two lever connectors (left and right) with the same number N of
  clamps (2, 3 or 4), linked by one cable whose colour encodes N (2 yellow, 3 blue, 4 red) and
  which ends in the same clamp on both sides (mirror symmetry). Structural: ``cable_damage``
  (insulation cut open, copper strands showing), ``broken_clamp`` (a lever broken off),
  ``contamination``. Logical: ``wrong_cable_color`` (the cable has another N's colour),
  ``clamp_mismatch`` (one connector has another number of clamps), ``cable_position`` (the
  cable ends in different clamps on the two sides), ``missing_cable``.
* ``breakfast_box``: a box whose left compartment holds exactly two tangerines and one
  nectarine at free positions, and whose right compartment holds cereal in the upper half and
  a banana-chip/almond mix in the lower half (ratio 0.5 +- 0.03). Structural:
  ``damaged_fruit`` (a brown bruise), ``contamination`` (a foreign piece), ``box_damage`` (a
  crease on the box floor). Logical: ``missing_fruit`` (a tangerine or the nectarine is
  missing), ``extra_fruit`` (a third tangerine or a second nectarine), ``wrong_ratio`` (the
  cereal fills 0.2-0.28 or 0.72-0.8 of the compartment).

Annotations, as MVTec LOCO AD's: ``ground_truth/<kind>/<image_id>/000.png, 001.png, ...``,
one single-channel PNG per annotated region holding 0 and the defect's ``pixel_value`` from
``defects_config.json``. Structural masks are exact: the pixels the damage changed by at least
:data:`vad_datasets.synth.CHANGE_THRESHOLD` gray levels in some channel (holes filled), so
their saturation threshold is relative 1.0 (plain PRO). Logical masks hold the union of the
areas that could be the cause, following the thesis (§6.3.1): a missing object's region is
where it could have been (the empty compartment; the free floor of the fruit compartment; the
space between the connectors), an extra object's region is every object of that kind that
could be the extra one (both pins of the compartment; every fruit of that kind), a mismatch's
region is the object that disagrees (the cable of the wrong colour or position; the connector
whose clamps differ from the cable's and the other connector's), a missing separator's region
is where the wall would be, a wrong ratio's region is the band between the normal and the
actual boundary. Missing and extra objects saturate at an ABSOLUTE pixel count, the area of
one such object at this image size (a pin's head; a tangerine, the smaller fruit; the cable's
length times its width): finding one pin's worth of the empty compartment is full detection.
The cable, connector and ratio regions saturate at RELATIVE 0.5, the missing separator at
relative 1.0. ``vad_datasets.loco.saturation_area`` applies them as the official evaluation.
The data set plugin is ``mvtec-loco``; the folder names are the real ones, so
``--category pushpins`` etc. read as they would from the official archive.

Everything is drawn from ``numpy.random.default_rng([seed, category, split, image])`` (splits
0 train, 1 validation, 2 test good, 3 structural, 4 logical): the same bytes for the same
arguments. The root is built in a temporary sibling folder and renamed into place; a marker
``loco_data.json`` (version and arguments) makes a rebuild with the same arguments a no-op.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

SEED = 20240701
CATEGORIES = ("pushpins", "splicing_connectors", "breakfast_box")
#: Defect types per category and kind, in the order images cycle through them.
DEFECTS = {
    "pushpins": {
        "structural": ("broken_pushpin", "color", "contamination"),
        "logical": ("missing_pushpin", "additional_pushpin", "missing_separator"),
    },
    "splicing_connectors": {
        "structural": ("cable_damage", "broken_clamp", "contamination"),
        "logical": ("wrong_cable_color", "clamp_mismatch", "cable_position", "missing_cable"),
    },
    "breakfast_box": {
        "structural": ("damaged_fruit", "contamination", "box_damage"),
        "logical": ("missing_fruit", "extra_fruit", "wrong_ratio"),
    },
}
KINDS = {"structural": "structural_anomalies", "logical": "logical_anomalies"}
#: Written last into the root: what was built, so a rebuild with the same arguments is skipped.
MARKER = "loco_data.json"
#: Bump when the drawing code changes (a marker of another version triggers a rebuild).
VERSION = 1

# Geometry, in object units (1.0 = the image side at scale 1).
PIN_RADIUS = 0.038
NEEDLE = 0.035  # needle length beyond the head
TRAY = (0.03, 0.97)  # tray's outer edge
GRID = (0.06, 0.94)  # compartments' span
ROWS, COLS, WALL = 2, 3, 0.02
CELL_W = (GRID[1] - GRID[0] - (COLS - 1) * WALL) / COLS
CELL_H = (GRID[1] - GRID[0] - (ROWS - 1) * WALL) / ROWS
PIN_YELLOW = (232.0, 192.0, 40.0)
FOREIGN_PIN_COLOURS = ((60.0, 110.0, 215.0), (210.0, 50.0, 55.0), (70.0, 175.0, 85.0), (235.0, 235.0, 240.0))

PITCH = 0.11  # clamp pitch of a connector
RIM = 0.02  # housing beyond the outer clamps
HOUSING_W = 0.09  # housing's half width
LEVER_U = 0.026  # lever centre from the housing centre (towards the image edge)
CABLE_WIDTH = 0.034
CABLE_COLOURS = {2: (226.0, 196.0, 46.0), 3: (46.0, 98.0, 200.0), 4: (205.0, 50.0, 45.0)}
CONNECTOR_X = (0.2, 0.8)
HOLE_W = 0.058  # from the connector's centre to its wire holes (towards the middle)
LEVER_COLOUR = (238.0, 128.0, 36.0)

TANGERINE, NECTARINE = 0.085, 0.098  # fruit radii
LEFT_BOX = (0.05, 0.485, 0.05, 0.95)  # u0, u1, v0, v1 of the fruit compartment
RIGHT_BOX = (0.515, 0.95, 0.05, 0.95)
RATIO = 0.5  # share of the right compartment's height that holds cereal

#: A structural defect whose mask covers fewer pixels than this share of the image (e.g. dirt
#: hidden under nothing visible) is drawn again.
MIN_DEFECT_SHARE = 25 / 256**2


# --------------------------------------------------------------------------- drawing helpers


class Canvas:
    """Pixel grid in object coordinates (``u`` right, ``v`` down; pose-jittered), plus this
    image's lighting and sensor noise, drawn once so a clean and a damaged rendering differ
    only by the damage."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.size = size
        self.window = (slice(0, size), slice(0, size))
        angle = np.deg2rad(rng.uniform(-1.5, 1.5))
        shift = rng.uniform(-0.012, 0.012, 2)
        scale = rng.uniform(0.985, 1.015)
        self.pose = (float(angle), shift.astype(float), float(scale))
        yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
        yy, xx = yy - shift[0], xx - shift[1]
        c, s = np.cos(angle), np.sin(angle)
        self.u = ((c * xx + s * yy) / scale + 0.5).astype(np.float32)
        self.v = ((-s * xx + c * yy) / scale + 0.5).astype(np.float32)
        self.px = float(size * scale)  # pixels per object unit
        self.gain = rng.uniform(0.975, 1.025, 3).astype(np.float32)
        self.offset = float(rng.uniform(-6.0, 6.0))
        direction = rng.uniform(0, 2 * np.pi)
        self.gradient = (1.0 + rng.uniform(0.0, 0.06) * (np.cos(direction) * xx + np.sin(direction) * yy) * 2).astype(np.float32)
        self.noise = 2.0 * rng.standard_normal((size, size, 3), dtype=np.float32)

    def crop(self, cv: float, cu: float, reach_v: float, reach_u: float | None = None) -> Canvas:
        """A view of the pixels within ``reach`` (object units, plus 3 px) of a point: the same
        drawing methods on a window, whose slices into the image are ``window``."""
        angle, shift, scale = self.pose
        xx, yy = (cu - 0.5) * scale, (cv - 0.5) * scale
        x = (np.cos(angle) * xx - np.sin(angle) * yy + shift[1] + 0.5) * self.size - 0.5
        y = (np.sin(angle) * xx + np.cos(angle) * yy + shift[0] + 0.5) * self.size - 0.5
        reach_u = reach_v if reach_u is None else reach_u
        # a rotated rectangle's bounding box: both reaches count along both axes (angles are small)
        ry = (reach_v + 0.03 * reach_u) * self.px + 3
        rx = (reach_u + 0.03 * reach_v) * self.px + 3
        top, bottom = max(int(y - ry), 0), min(int(np.ceil(y + ry)) + 1, self.size)
        left, right = max(int(x - rx), 0), min(int(np.ceil(x + rx)) + 1, self.size)
        view = copy.copy(self)
        view.window = (slice(top, max(bottom, top)), slice(left, max(right, left)))
        view.u, view.v = self.u[view.window], self.v[view.window]
        return view

    def full(self, alpha: np.ndarray) -> np.ndarray:
        """A view's array placed into a zero image-sized array."""
        out = np.zeros((self.size, self.size) + alpha.shape[2:], alpha.dtype)
        out[self.window] = alpha
        return out

    def disc(self, cv: float, cu: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Anti-aliased coverage of a disc and the distance to its centre (object units)."""
        distance = np.hypot(self.v - cv, self.u - cu)
        return np.clip((radius - distance) * self.px + 0.5, 0, 1), distance

    def box(self, cv: float, cu: float, half_v: float, half_u: float, rounding: float = 0.0) -> np.ndarray:
        """Anti-aliased coverage of an axis-aligned (in object units) rounded rectangle."""
        qv = np.abs(self.v - cv) - (half_v - rounding)
        qu = np.abs(self.u - cu) - (half_u - rounding)
        sdf = np.hypot(np.maximum(qv, 0), np.maximum(qu, 0)) + np.minimum(np.maximum(qv, qu), 0) - rounding
        return np.clip(-sdf * self.px + 0.5, 0, 1)

    def segment(self, p0: np.ndarray, p1: np.ndarray, half_width: float) -> np.ndarray:
        """Anti-aliased coverage of a capsule from ``p0`` to ``p1`` ((v, u) object units)."""
        d = p1 - p0
        t = np.clip(((self.v - p0[0]) * d[0] + (self.u - p0[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
        distance = np.hypot(self.v - p0[0] - t * d[0], self.u - p0[1] - t * d[1])
        return np.clip((half_width - distance) * self.px + 0.5, 0, 1)

    def finish(self, rgb: np.ndarray) -> np.ndarray:
        """Lighting and sensor noise on a rendering (float32, not yet rounded)."""
        return rgb * self.gain * self.gradient[..., None] + self.offset + self.noise


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]: a ``cells`` x ``cells`` grid upsampled bicubically."""
    from PIL import Image

    grid = rng.uniform(-1.0, 1.0, (cells + 3, cells + 3)).astype(np.float32)
    side = size * (cells + 3) // cells
    big = np.asarray(Image.fromarray(grid, mode="F").resize((side, side), Image.BICUBIC), dtype=np.float32)
    return big[:size, :size]


def _over(out: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    """``colour`` (an RGB triple or ``[H, W, 3]``) over ``out`` with coverage ``alpha``."""
    a = alpha[..., None]
    return out * (1 - a) + np.asarray(colour, np.float32) * a


#: A drawn object: the canvas view it was drawn on, its colour ``[h, w, 3]`` and coverage ``[h, w]``.
Layer = tuple[Canvas, np.ndarray, np.ndarray]


def _paint(image: np.ndarray, layers, shadow: tuple[float, float, float] | None = None) -> np.ndarray:
    """Composite ``layers`` over a copy of ``image``; with ``shadow`` (offset, blur, strength in
    object units) they first cast one soft drop shadow together."""
    image = image.copy()
    if shadow is not None and layers:
        canvas = layers[0][0]
        union = np.zeros(image.shape[:2], np.float32)
        for view, _, alpha in layers:
            np.maximum(union[view.window], alpha, out=union[view.window])
        image *= (1 - _shadow(union, canvas, *shadow))[..., None]
    for view, colour, alpha in layers:
        image[view.window] = _over(image[view.window], colour, alpha)
    return image


def _shadow(alpha: np.ndarray, canvas: Canvas, offset: float, sigma: float, strength: float) -> np.ndarray:
    """A soft drop shadow's darkening weight: ``alpha`` blurred and shifted down-right (object units)."""
    from scipy import ndimage

    px = max(int(round(offset * canvas.px)), 1)
    blurred = ndimage.gaussian_filter(alpha, sigma=max(sigma * canvas.px, 0.5))
    shifted = np.zeros_like(blurred)
    shifted[px:, px:] = blurred[:-px, :-px]
    return strength * shifted


def _cells(rng: np.random.Generator, canvas: Canvas, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Cellular (Voronoi) noise of a jittered grid in object units: nearest cell's id, distance
    to the nearest and second-nearest seed, and the number of cells (ids are < it)."""
    margin = 0.15
    n = int(np.ceil((1 + 2 * margin) / step)) + 2
    jitter = rng.uniform(0.1, 0.9, (n, n, 2)).astype(np.float32)
    iu = np.clip(np.floor((canvas.u + margin) / step).astype(int), 0, n - 1)
    iv = np.clip(np.floor((canvas.v + margin) / step).astype(int), 0, n - 1)
    first = np.full(canvas.u.shape, np.inf, np.float32)
    second = first.copy()
    ident = np.zeros(canvas.u.shape, int)
    for dv in (-1, 0, 1):
        for du in (-1, 0, 1):
            cu, cv = np.clip(iu + du, 0, n - 1), np.clip(iv + dv, 0, n - 1)
            su = (cu + jitter[cv, cu, 0]) * step - margin
            sv = (cv + jitter[cv, cu, 1]) * step - margin
            d = np.hypot(canvas.u - su, canvas.v - sv)
            closer = d < first
            second = np.where(closer, first, np.minimum(second, d))
            ident = np.where(closer, cv * n + cu, ident)
            first = np.where(closer, d, first)
    return ident, first, second, n * n


def _blob(rng: np.random.Generator, canvas: Canvas, allowed: np.ndarray, radius: float) -> np.ndarray:
    """A soft irregular blob weight in [0, 1] of about ``radius`` (object units), centred on a
    random pixel of ``allowed``."""
    from scipy import ndimage

    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        candidates = np.arange(allowed.size)
    y, x = np.unravel_index(int(rng.choice(candidates)), allowed.shape)
    size = canvas.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.zeros((size, size), np.float32)
    r = radius * canvas.px
    for _ in range(3):
        oy, ox = np.array([y, x]) + rng.normal(0, 0.4 * r, 2)
        sy, sx = rng.uniform(0.35, 0.7, 2) * r
        field += np.exp(-(((yy - oy) / sy) ** 2 + ((xx - ox) / sx) ** 2) / 2)
    return np.clip(ndimage.gaussian_filter((field > 0.5).astype(np.float32), sigma=max(0.08 * r, 0.5)) * 1.3, 0, 1)


def _contamination(rng: np.random.Generator, canvas: Canvas, allowed: np.ndarray, radius: tuple[float, float]) -> Layer:
    """A foreign blob (dark dirt, a blue plastic shred or white fluff) centred in ``allowed``."""
    weight = _blob(rng, canvas, allowed, rng.uniform(*radius))
    tones = ((42.0, 36.0, 32.0), (50.0, 100.0, 185.0), (245.0, 245.0, 240.0))
    tone = np.asarray(tones[int(rng.integers(len(tones)))], np.float32)
    texture = tone * (1 + 0.08 * _value_noise(rng, canvas.size, max(canvas.size // 8, 2)))[..., None]
    return canvas, texture, 0.92 * weight


def _changed(clean: np.ndarray, damaged: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    from vad_datasets.synth import CHANGE_THRESHOLD

    return ndimage.binary_fill_holes(np.abs(damaged - clean).max(axis=2) >= CHANGE_THRESHOLD)


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=pixels) if pixels > 0 else mask


# --------------------------------------------------------------------------- pushpins


def _compartment(row: int, col: int) -> tuple[float, float, float, float]:
    """``(v0, u0, v1, u1)`` of a compartment's floor."""
    v0 = GRID[0] + row * (CELL_H + WALL)
    u0 = GRID[0] + col * (CELL_W + WALL)
    return v0, u0, v0 + CELL_H, u0 + CELL_W


def _pins_in(rng: np.random.Generator, row: int, col: int, count: int = 1) -> list[dict]:
    """``count`` pins at jittered positions in a compartment, several ones well apart (the
    draw whose closest pair is farthest, of up to 200, stopping at 5 head radii), so that each
    of two pins looks like a compartment's single pin."""
    v0, u0, v1, u1 = _compartment(row, col)
    reach = PIN_RADIUS + NEEDLE + 0.006
    best, best_gap = None, -1.0
    for _ in range(200):
        centres = rng.uniform((v0 + reach, u0 + reach), (v1 - reach, u1 - reach), (count, 2)).astype(np.float32)
        gap = min((float(np.hypot(*(a - b))) for i, a in enumerate(centres) for b in centres[i + 1 :]), default=np.inf)
        if gap > best_gap:
            best, best_gap = centres, gap
        if gap > 5 * PIN_RADIUS:
            break
    return [{"centre": c, "angle": rng.uniform(0, 2 * np.pi), "tone": rng.uniform(0.95, 1.05), "colour": PIN_YELLOW} for c in best]


def _pin_layers(canvas: Canvas, pin: dict) -> dict[str, Layer]:
    """Needle and head of one pin."""
    cv, cu = (float(x) for x in pin["centre"])
    view = canvas.crop(cv, cu, PIN_RADIUS + NEEDLE + 0.01)
    direction = np.array([np.sin(pin["angle"]), np.cos(pin["angle"])], np.float32)
    start = pin["centre"] + direction * 0.5 * PIN_RADIUS
    end = pin["centre"] + direction * (PIN_RADIUS + NEEDLE)
    needle = view.segment(start, end, 0.0045)
    head, distance = view.disc(cv, cu, PIN_RADIUS)
    d = np.clip(distance / PIN_RADIUS, 0, 1)
    base = np.asarray(pin["colour"], np.float32) * pin["tone"]
    shade = (1.0 - 0.3 * d**2) * (1 - 0.3 * np.clip((d - 0.82) / 0.18, 0, 1))
    spot = 0.85 * np.exp(-(((view.v - cv + 0.35 * PIN_RADIUS) ** 2 + (view.u - cu + 0.35 * PIN_RADIUS) ** 2) / (2 * (0.25 * PIN_RADIUS) ** 2)))
    colour = base * shade[..., None]
    colour = colour + (255.0 - colour) * spot[..., None]
    steel = np.float32(160.0) + 40.0 * np.exp(-(((view.v - end[0]) ** 2 + (view.u - end[1]) ** 2) / (2 * (NEEDLE / 2) ** 2)))
    return {"needle": (view, steel[..., None] * np.float32([1.0, 1.0, 1.04]), needle), "head": (view, colour, head)}


def pushpins(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One pushpins image (float32 RGB, before rounding) and its annotated regions."""
    canvas = Canvas(rng, size)
    mottle = _value_noise(rng, size, 5)
    grain = _value_noise(rng, size, max(size // 6, 2))
    cells = [(r, c) for r in range(ROWS) for c in range(COLS)]
    pins = {cell: _pins_in(rng, *cell) for cell in cells}
    missing_wall: tuple[int, int] | None = None
    regions: list[tuple[str, np.ndarray]] = []

    def floor_of(cell: tuple[int, int]) -> np.ndarray:
        v0, u0, v1, u1 = _compartment(*cell)
        return canvas.box((v0 + v1) / 2, (u0 + u1) / 2, (v1 - v0) / 2, (u1 - u0) / 2) >= 0.5

    def add_pin(cell: tuple[int, int]) -> None:
        pins[cell] = _pins_in(rng, *cell, 2)

    def pins_mask(cell: tuple[int, int]) -> np.ndarray:
        union = np.zeros((size, size), bool)
        for pin in pins[cell]:
            for view, _, alpha in _pin_layers(canvas, pin).values():
                union |= view.full(alpha >= 0.5)
        return _dilate(union, max(size // 128, 1))

    if defect == "missing_pushpin":
        empty, other = (cells[i] for i in rng.choice(len(cells), 2, replace=False))
        pins[empty] = []
        regions.append((defect, floor_of(empty)))
        if rng.random() < 0.25:  # the pin went to another compartment
            add_pin(other)
            regions.append(("additional_pushpin", pins_mask(other)))
    elif defect == "additional_pushpin":
        cell = cells[int(rng.integers(len(cells)))]
        add_pin(cell)
        regions.append((defect, pins_mask(cell)))
    elif defect == "missing_separator":
        missing_wall = (int(rng.integers(ROWS)), int(rng.integers(COLS - 1)))

    # the tray: table, frame, floors, walls with a shadow on the floor below them
    out = np.empty((size, size, 3), np.float32)
    out[:] = np.float32([58.0, 60.0, 64.0]) * (1 + 0.05 * mottle)[..., None]
    tray = canvas.box(0.5, 0.5, (TRAY[1] - TRAY[0]) / 2, (TRAY[1] - TRAY[0]) / 2, 0.02)
    floors = np.zeros((size, size), np.float32)
    openings = [(*_compartment(*cell), 0.006) for cell in cells]  # (v0, u0, v1, u1, rounding)
    if missing_wall is not None:
        row, col = missing_wall
        v0, _, v1, u1 = _compartment(row, col)
        openings.append((v0, u1 - 0.008, v1, u1 + WALL + 0.008, 0.0))
        wall = canvas.crop((v0 + v1) / 2, u1 + WALL / 2, (v1 - v0) / 2, WALL / 2)
        regions.append(("missing_separator", wall.full(wall.box((v0 + v1) / 2, u1 + WALL / 2, (v1 - v0) / 2, WALL / 2) >= 0.5)))
    for v0, u0, v1, u1, rounding in openings:
        view = canvas.crop((v0 + v1) / 2, (u0 + u1) / 2, (v1 - v0) / 2, (u1 - u0) / 2)
        np.maximum(floors[view.window], view.box((v0 + v1) / 2, (u0 + u1) / 2, (v1 - v0) / 2, (u1 - u0) / 2, rounding), out=floors[view.window])
    walls = tray * (1 - floors)
    floor_colour = np.float32([166.0, 172.0, 182.0]) * (1 + 0.035 * mottle + 0.02 * grain)[..., None]
    out = _over(out, floor_colour, tray)
    out = out * (1 - _shadow(walls, canvas, 0.008, 0.006, 0.35))[..., None]
    wall_colour = np.float32([214.0, 217.0, 223.0]) * (1 + 0.02 * grain)[..., None]
    out = _over(out, wall_colour, walls)

    layers: dict[str, Layer] = {}
    pin_of: dict[str, dict] = {}
    for cell in cells:
        for number, pin in enumerate(pins[cell]):
            for part, layer in _pin_layers(canvas, pin).items():
                layers[f"{cell[0]}-{cell[1]}-{number}-{part}"] = layer
            pin_of[f"{cell[0]}-{cell[1]}-{number}-head"] = pin

    def render(layers: dict[str, Layer], extra: list[Layer] = ()) -> np.ndarray:
        return canvas.finish(_paint(_paint(out, list(layers.values()), shadow=(0.008, 0.005, 0.4)), extra))

    clean = render(layers)
    if defect not in DEFECTS["pushpins"]["structural"]:
        return clean, regions
    heads = sorted(name for name in layers if name.endswith("head"))
    name = heads[int(rng.integers(len(heads)))]
    damaged_layers = dict(layers)
    extra = []
    view, colour, alpha = layers[name]
    if defect == "broken_pushpin":
        from scipy import ndimage

        pin = pin_of[name]
        angle = rng.uniform(0, 2 * np.pi)
        bite = np.zeros(alpha.shape, np.float32)
        for _ in range(3):  # a jagged bite of three overlapping discs at the rim
            a = angle + rng.uniform(-0.5, 0.5)
            centre = pin["centre"] + PIN_RADIUS * rng.uniform(0.8, 1.05) * np.array([np.sin(a), np.cos(a)])
            bite = np.maximum(bite, view.disc(float(centre[0]), float(centre[1]), PIN_RADIUS * rng.uniform(0.35, 0.55))[0])
        rim = np.clip(2 * ndimage.gaussian_filter(bite, sigma=max(0.006 * canvas.px, 0.5)), 0, 1) * (1 - bite)  # fracture edge
        damaged_layers[name] = (view, colour * (1 - 0.45 * rim)[..., None], alpha * (1 - bite))
    elif defect == "color":
        foreign = np.asarray(FOREIGN_PIN_COLOURS[int(rng.integers(len(FOREIGN_PIN_COLOURS)))], np.float32)
        brightness = colour.mean(axis=2, keepdims=True) / np.float32(np.mean(PIN_YELLOW))
        damaged_layers[name] = (view, np.clip(foreign * brightness, 0, 255), alpha)
    else:  # contamination, anywhere on the tray
        extra.append(_contamination(rng, canvas, canvas.box(0.5, 0.5, 0.42, 0.42) >= 0.5, (0.025, 0.045)))
    damaged = render(damaged_layers, extra)
    return damaged, [(defect, _changed(clean, damaged))]


# --------------------------------------------------------------------------- splicing connectors


def _connector(canvas: Canvas, cv: float, cu: float, clamps: int, side: int, grain: np.ndarray) -> dict[str, Layer]:
    """Housing, wire holes and levers of a connector (``side`` -1 left, +1 right: the levers
    point to the image edge, the holes to the middle)."""
    half_v = clamps * PITCH / 2 + RIM
    view = canvas.crop(cv, cu, half_v + 0.01, HOUSING_W + 0.01)
    housing = view.box(cv, cu, half_v, HOUSING_W, 0.016)
    w = (view.u - cu) * side  # > 0 towards the image edge
    body = np.float32([222.0, 222.0, 216.0]) * (1 - 0.1 * np.clip(np.abs(w) / HOUSING_W, 0, 1) ** 2 + 0.02 * grain[view.window])[..., None]
    ridges = np.zeros(housing.shape, np.float32)
    for i in range(1, clamps):
        ridges = np.maximum(ridges, view.box(cv - clamps * PITCH / 2 + i * PITCH, cu, 0.003, HOUSING_W - 0.006))
    body = body * (1 - 0.25 * ridges)[..., None]
    holes = np.zeros(housing.shape, np.float32)
    levers = np.zeros(housing.shape, np.float32)
    lever_shade = np.zeros(housing.shape, np.float32)
    for i in range(clamps):
        y = _clamp_y(cv, clamps, i)
        holes = np.maximum(holes, view.box(y, cu - side * HOLE_W, 0.02, 0.018, 0.007))
        lever = view.box(y, cu + side * LEVER_U, 0.039, 0.055, 0.012)
        levers = np.maximum(levers, lever)
        lever_shade = np.maximum(lever_shade, lever * (0.85 + 0.3 * np.clip(1 - np.abs(view.v - y + 0.015) / 0.012, 0, 1)))
    lever_colour = np.float32(LEVER_COLOUR) * np.clip(lever_shade, 0.85, 1.15)[..., None]
    return {"housing": (view, body, housing), "holes": (view, np.full(housing.shape + (3,), 36.0, np.float32), holes), "levers": (view, lever_colour, levers)}


def _clamp_y(cv: float, clamps: int, index: int) -> float:
    return cv - clamps * PITCH / 2 + (index + 0.5) * PITCH


def _cable(canvas: Canvas, start: np.ndarray, end: np.ndarray, sag: float, colour) -> tuple[Layer, np.ndarray]:
    """A tube from ``start`` to ``end`` ((v, u), left to right) sagging by ``sag``, and the
    position along it (0 at ``start``, 1 at ``end``) on its view."""
    low = min(start[0], end[0]) + min(sag, 0.0)
    high = max(start[0], end[0]) + max(sag, 0.0)
    view = canvas.crop((low + high) / 2, (start[1] + end[1]) / 2, (high - low) / 2 + CABLE_WIDTH, (end[1] - start[1]) / 2)
    t = (view.u - start[1]) / (end[1] - start[1])
    centre = start[0] + (end[0] - start[0]) * t + 4 * sag * t * (1 - t)
    slope = ((end[0] - start[0]) + 4 * sag * (1 - 2 * t)) / (end[1] - start[1])
    across = (view.v - centre) / np.sqrt(1 + slope**2) / (CABLE_WIDTH / 2)
    inside = np.clip(np.minimum(t, 1 - t) * (end[1] - start[1]) * view.px + 0.5, 0, 1)
    coverage = np.clip((1 - np.abs(across)) * CABLE_WIDTH / 2 * view.px + 0.5, 0, 1) * inside
    a = np.clip(across, -1, 1)
    shade = 0.72 + 0.3 * np.sqrt(1 - a**2) + 0.35 * np.exp(-(((a + 0.4) / 0.25) ** 2))
    tube = np.clip(np.asarray(colour, np.float32) * shade[..., None], 0, 255)
    return (view, tube, coverage), t


def splicing_connectors(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One splicing-connectors image (float32 RGB, before rounding) and its annotated regions."""
    canvas = Canvas(rng, size)
    mottle = _value_noise(rng, size, 5)
    grain = _value_noise(rng, size, max(size // 6, 2))
    clamps = int(rng.choice([2, 3, 4]))
    counts = [clamps, clamps]
    centres = [np.array([0.5 + rng.uniform(-0.03, 0.03), x + rng.uniform(-0.02, 0.02)], np.float32) for x in CONNECTOR_X]
    index = int(rng.integers(clamps))
    ends = [index, index]
    colour = CABLE_COLOURS[clamps]
    sag = rng.uniform(-0.06, 0.06)
    cable = True
    odd: int | None = None
    if defect == "wrong_cable_color":
        colour = CABLE_COLOURS[int(rng.choice([n for n in CABLE_COLOURS if n != clamps]))]
    elif defect == "clamp_mismatch":
        odd = int(rng.integers(2))
        counts[odd] = int(rng.choice([n for n in CABLE_COLOURS if n != clamps]))
        ends = [int(rng.integers(min(counts)))] * 2
    elif defect == "cable_position":
        ends[int(rng.integers(2))] = int(rng.choice([i for i in range(clamps) if i != index]))
    elif defect == "missing_cable":
        cable = False

    out = np.empty((size, size, 3), np.float32)
    out[:] = np.float32([178.0, 184.0, 192.0]) * (1 + 0.04 * mottle + 0.015 * grain)[..., None]
    parts: dict[str, Layer] = {}
    for number, (centre, side) in enumerate(zip(centres, (-1, 1))):
        for name, layer in _connector(canvas, float(centre[0]), float(centre[1]), counts[number], side, grain).items():
            parts[f"{number}-{name}"] = layer
    holes = [np.array([_clamp_y(float(c[0]), n, e), float(c[1]) - side * HOLE_W], np.float32)
             for c, n, e, side in zip(centres, counts, ends, (-1, 1))]
    along = None
    if cable:
        parts["cable"], along = _cable(canvas, holes[0], holes[1], sag, colour)

    def full(name: str) -> np.ndarray:
        view, _, alpha = parts[name]
        return view.full(alpha >= 0.5)

    regions: list[tuple[str, np.ndarray]] = []
    if defect in ("wrong_cable_color", "cable_position"):
        regions.append((defect, full("cable")))
    elif defect == "clamp_mismatch":
        regions.append((defect, full(f"{odd}-housing") | full(f"{odd}-levers")))
    elif defect == "missing_cable":
        top = min(float(c[0]) - n * PITCH / 2 for c, n in zip(centres, counts))
        bottom = max(float(c[0]) + n * PITCH / 2 for c, n in zip(centres, counts))
        left, right = float(holes[0][1]), float(holes[1][1])
        regions.append((defect, canvas.box((top + bottom) / 2, (left + right) / 2, (bottom - top) / 2, (right - left) / 2) >= 0.5))

    def render(parts: dict[str, Layer], extra: list[Layer] = ()) -> np.ndarray:
        return canvas.finish(_paint(_paint(out, list(parts.values()), shadow=(0.01, 0.008, 0.35)), extra))

    clean = render(parts)
    if defect not in DEFECTS["splicing_connectors"]["structural"]:
        return clean, regions
    damaged_parts = dict(parts)
    extra = []
    if defect == "cable_damage":
        view, tube, coverage = parts["cable"]
        start = rng.uniform(0.2, 0.7)
        length = rng.uniform(0.08, 0.14)
        cut = np.clip(np.minimum(along - start, start + length - along) * (holes[1][1] - holes[0][1]) * view.px + 0.5, 0, 1)
        strands = 0.8 + 0.25 * np.sin(view.v * view.px * 2.2) ** 2
        copper = np.float32([200.0, 122.0, 60.0]) * (tube.mean(axis=2, keepdims=True) / np.float32(np.mean(colour))) * strands[..., None]
        damaged_parts["cable"] = (view, tube * (1 - cut[..., None]) + np.clip(copper, 0, 255) * cut[..., None], coverage * (1 - 0.25 * cut))
    elif defect == "broken_clamp":
        number = int(rng.integers(2))
        side = (-1, 1)[number]
        centre = centres[number]
        y = _clamp_y(float(centre[0]), counts[number], int(rng.integers(counts[number])))
        view, lever_colour, levers = parts[f"{number}-levers"]
        broken = view.box(y + rng.uniform(-0.025, 0.025), float(centre[1]) + side * rng.uniform(0.06, 0.085), rng.uniform(0.025, 0.04), 0.04, 0.004)
        damaged_parts[f"{number}-levers"] = (view, lever_colour, levers * (1 - broken))
        cavity = 0.8 * broken * levers * parts[f"{number}-housing"][2]
        extra.append((view, np.full(cavity.shape + (3,), 70.0, np.float32), cavity))
    else:  # contamination, anywhere but at the image border
        extra.append(_contamination(rng, canvas, canvas.box(0.5, 0.5, 0.4, 0.4) >= 0.5, (0.025, 0.045)))
    damaged = render(damaged_parts, extra)
    return damaged, [(defect, _changed(clean, damaged))]


# --------------------------------------------------------------------------- breakfast box


def _place_fruits(rng: np.random.Generator, radii: list[float]) -> list[np.ndarray]:
    """Non-overlapping centres inside the fruit compartment (rejection sampling, bounded)."""
    u0, u1, v0, v1 = LEFT_BOX
    for _ in range(500):
        centres: list[np.ndarray] = []
        for radius in radii:
            for _ in range(100):
                centre = np.array([rng.uniform(v0 + radius + 0.01, v1 - radius - 0.01), rng.uniform(u0 + radius + 0.01, u1 - radius - 0.01)], np.float32)
                if all(np.hypot(*(centre - other)) > radius + r + 0.012 for other, r in zip(centres, radii)):
                    centres.append(centre)
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError("cannot place the fruits")  # pragma: no cover - the compartment is roomy


def _fruit(canvas: Canvas, centre: np.ndarray, radius: float, kind: str, look: dict, dimples: np.ndarray) -> Layer:
    cv, cu = float(centre[0]), float(centre[1])
    view = canvas.crop(cv, cu, radius + 0.01)
    coverage, distance = view.disc(cv, cu, radius)
    d = np.clip(distance / radius, 0, 1)
    dimples = dimples[view.window]
    if kind == "tangerine":
        colour = np.float32([240.0, 136.0, 32.0]) * look["tone"] * (1 + 0.07 * dimples)[..., None]
    else:  # nectarine: red to yellow across a random direction
        a = look["angle"]
        t = np.clip(0.5 + ((view.v - cv) * np.sin(a) + (view.u - cu) * np.cos(a)) / (2 * radius), 0, 1)
        colour = (np.float32([192.0, 52.0, 48.0]) * (1 - t)[..., None] + np.float32([236.0, 168.0, 72.0]) * t[..., None]) * look["tone"]
        colour = colour * (1 + 0.025 * dimples)[..., None]
    shade = 1.0 - 0.35 * d**2.5
    spot = 0.55 * np.exp(-(((view.v - cv + 0.4 * radius) ** 2 + (view.u - cu + 0.4 * radius) ** 2) / (2 * (0.22 * radius) ** 2)))
    colour = colour * shade[..., None]
    colour = colour + (255.0 - colour) * spot[..., None]
    stem, _ = view.disc(cv + look["stem"][0] * radius, cu + look["stem"][1] * radius, 0.1 * radius)
    colour = _over(colour, (70.0, 86.0, 40.0) if kind == "tangerine" else (110.0, 70.0, 40.0), stem)
    return view, np.clip(colour, 0, 255), coverage


def _fruit_look(rng: np.random.Generator) -> dict:
    return {"tone": rng.uniform(0.94, 1.04), "angle": rng.uniform(0, 2 * np.pi), "stem": rng.uniform(-0.35, 0.35, 2)}


def _granules(rng: np.random.Generator, view: Canvas, step: float, colours, shares, ring: float) -> np.ndarray:
    """A layer of rounded granules of about ``step`` (object units) with dark gaps; each granule
    takes one of ``colours`` with probabilities ``shares`` (a seed ring of depth ``ring`` on
    the first colour)."""
    ident, first, second, count = _cells(rng, view, step)
    choice = rng.choice(len(colours), size=count, p=shares)[ident]
    tone = rng.normal(0, 1, count).astype(np.float32)[ident]
    gap = (second - first) * view.px
    bulge = 0.72 + 0.32 * np.clip(gap / (step * view.px / 3.5), 0, 1) ** 0.5
    joint = np.clip((gap / (step * view.px) - 0.14) / 0.18, 0, 1)  # dark gaps of about a seventh of a granule
    base = np.asarray(colours, np.float32)[choice]
    rings = 1 - ring * np.exp(-(((first / step) - 0.22) / 0.05) ** 2) * (choice == 0)
    granule = base * ((1 + 0.08 * tone) * bulge * rings)[..., None]
    return granule * joint[..., None] + np.float32([86.0, 60.0, 34.0]) * (1 - joint)[..., None]


def breakfast_box(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """One breakfast-box image (float32 RGB, before rounding) and its annotated regions."""
    canvas = Canvas(rng, size)
    mottle = _value_noise(rng, size, 5)
    grain = _value_noise(rng, size, max(size // 6, 2))
    dimples = _value_noise(rng, size, max(size // 4, 2))
    kinds = ["tangerine", "tangerine", "nectarine"]
    ratio = RATIO + rng.uniform(-0.03, 0.03)
    if defect == "missing_fruit":
        kinds.pop(int(rng.integers(3)))
    elif defect == "extra_fruit":
        kinds.append(str(rng.choice(["tangerine", "nectarine"])))
    elif defect == "wrong_ratio":
        ratio = float(rng.choice([-1, 1])) * rng.uniform(0.22, 0.3) + RATIO
    radii = [TANGERINE if k == "tangerine" else NECTARINE for k in kinds]
    centres = _place_fruits(rng, radii)
    looks = [_fruit_look(rng) for _ in kinds]

    # the box: table, walls, the fruit compartment's floor, cereal over the mix on the right
    out = np.empty((size, size, 3), np.float32)
    out[:] = np.float32([52.0, 48.0, 46.0]) * (1 + 0.05 * mottle)[..., None]
    box = canvas.box(0.5, 0.5, 0.48, 0.48, 0.015)
    u0, u1, v0, v1 = LEFT_BOX
    left = canvas.box((v0 + v1) / 2, (u0 + u1) / 2, (v1 - v0) / 2, (u1 - u0) / 2, 0.01)
    u0, u1, v0, v1 = RIGHT_BOX
    view = canvas.crop((v0 + v1) / 2, (u0 + u1) / 2, (v1 - v0) / 2, (u1 - u0) / 2)
    right = view.full(view.box((v0 + v1) / 2, (u0 + u1) / 2, (v1 - v0) / 2, (u1 - u0) / 2, 0.01))
    cardboard = np.float32([238.0, 232.0, 218.0]) * (1 + 0.02 * mottle + 0.015 * grain)[..., None]
    out = _over(out, cardboard * np.float32(0.93), box)
    walls = box * (1 - np.maximum(left, right))
    cereal = _granules(rng, view, 0.026, [(206.0, 158.0, 90.0)], [1.0], 0.0)
    mix = _granules(rng, view, 0.042, [(236.0, 216.0, 160.0), (148.0, 92.0, 54.0)], [0.6, 0.4], 0.12)
    phase = rng.uniform(0, 2 * np.pi)
    boundary = v0 + ratio * (v1 - v0) + 0.012 * np.sin(2 * np.pi * 2.5 * view.u + phase)
    upper = np.clip((boundary - view.v) * view.px + 0.5, 0, 1)[..., None]
    out[view.window] = _over(out[view.window], cereal * upper + mix * (1 - upper), right[view.window])
    out = _over(out, cardboard * (1 + 0.02 * grain)[..., None], left)
    out = out * (1 - _shadow(walls, canvas, 0.008, 0.006, 0.3) * (1 - walls))[..., None]
    fruits = [_fruit(canvas, c, r, k, look, dimples) for c, r, k, look in zip(centres, radii, kinds, looks)]

    regions: list[tuple[str, np.ndarray]] = []
    fruit_masks = [fruit_view.full(coverage >= 0.5) for fruit_view, _, coverage in fruits]
    if defect == "missing_fruit":
        taken = np.zeros((size, size), bool)
        for mask in fruit_masks:
            taken |= mask
        regions.append((defect, (left >= 0.5) & ~_dilate(taken, max(size // 128, 1))))
    elif defect == "extra_fruit":
        union = np.zeros((size, size), bool)
        for mask, kind in zip(fruit_masks, kinds):
            if kind == kinds[-1]:
                union |= mask
        regions.append((defect, _dilate(union, max(size // 128, 1))))
    elif defect == "wrong_ratio":
        low, high = sorted((v0 + RATIO * (v1 - v0), v0 + ratio * (v1 - v0)))
        band = canvas.box((low + high) / 2, (u0 + u1) / 2, (high - low) / 2, (u1 - u0) / 2)
        regions.append((defect, (band >= 0.5) & (right >= 0.5)))

    def render(fruits: list[Layer], extra: list[Layer] = (), under: list[Layer] = ()) -> np.ndarray:
        return canvas.finish(_paint(_paint(_paint(out, under), fruits, shadow=(0.012, 0.01, 0.4)), extra))

    clean = render(fruits)
    if defect not in DEFECTS["breakfast_box"]["structural"]:
        return clean, regions
    damaged_fruits = list(fruits)
    extra, under = [], []
    if defect == "damaged_fruit":
        number = int(rng.integers(len(fruits)))
        fruit_view, colour, alpha = fruits[number]
        core = fruit_view.full(fruit_view.disc(float(centres[number][0]), float(centres[number][1]), 0.5 * radii[number])[0] >= 0.5)
        weight = 0.85 * _blob(rng, canvas, core, 0.45 * radii[number])[fruit_view.window] * alpha
        bruise = np.float32([104.0, 60.0, 30.0]) * (1 + 0.12 * dimples[fruit_view.window])[..., None]
        damaged_fruits[number] = (fruit_view, _over(colour, bruise, weight), alpha)
    elif defect == "contamination":
        extra.append(_contamination(rng, canvas, canvas.box(0.5, 0.5, 0.44, 0.44) >= 0.5, (0.025, 0.045)))
    else:  # box_damage: a crease across the fruit compartment's floor (under the fruits)
        from vad_datasets.synth import quadratic_curve

        region = np.argwhere(left >= 0.5)
        (top, lft), (bottom, rgt) = region.min(axis=0), region.max(axis=0)
        curve = quadratic_curve(rng, size) / size * np.array([bottom - top, rgt - lft]) + np.array([top, lft])
        width = rng.uniform(0.008, 0.012) * size
        reach = int(np.ceil(width / 2 + 1))
        (y0, x0), (y1, x1) = np.floor(curve.min(axis=0)).astype(int) - reach, np.ceil(curve.max(axis=0)).astype(int) + reach + 1
        y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, size), min(x1, size)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        distance = np.full(yy.shape, np.inf, np.float32)
        for y, x in curve:
            np.minimum(distance, np.hypot(yy - y, xx - x), out=distance)
        crease = np.zeros((size, size), np.float32)
        crease[y0:y1, x0:x1] = np.clip(width / 2 + 0.5 - distance, 0, 1)
        under.append((canvas, np.full((size, size, 3), (120.0, 108.0, 92.0), np.float32), 0.75 * crease * left))
    damaged = render(damaged_fruits, extra, under)
    return damaged, [(defect, _changed(clean, damaged))]


# --------------------------------------------------------------------------- building

DRAW: dict[str, Callable[[np.random.Generator, int, str | None], tuple[np.ndarray, list[tuple[str, np.ndarray]]]]] = {
    "pushpins": pushpins,
    "splicing_connectors": splicing_connectors,
    "breakfast_box": breakfast_box,
}


def _object_area(radius: float, size: int) -> int:
    return int(round(np.pi * (radius * size) ** 2))


def defects_config(category: str, size: int) -> list[dict]:
    """The category's ``defects_config.json`` entries (pixel values 10, 20, ... in order)."""
    absolute = {  # missing / extra objects: one such object's area at this size
        "missing_pushpin": _object_area(PIN_RADIUS, size),
        "additional_pushpin": _object_area(PIN_RADIUS, size),
        "missing_cable": int(round((CONNECTOR_X[1] - CONNECTOR_X[0] - 2 * HOLE_W) * CABLE_WIDTH * size**2)),
        "missing_fruit": _object_area(TANGERINE, size),
        "extra_fruit": _object_area(TANGERINE, size),
    }
    entries = []
    names = DEFECTS[category]["structural"] + DEFECTS[category]["logical"]
    for number, name in enumerate(names):
        if name in DEFECTS[category]["structural"] or name == "missing_separator":
            threshold, relative = 1.0, True
        elif name in absolute:
            threshold, relative = absolute[name], False
        else:
            threshold, relative = 0.5, True
        entries.append({"defect_name": name, "pixel_value": 10 * (number + 1), "saturation_threshold": threshold, "relative_saturation": relative})
    return entries


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


README = {
    "pushpins": "Exactly one pushpin per compartment of the 2 x 3 tray.",
    "splicing_connectors": "Two connectors with the same number of clamps (2, 3 or 4), linked by one cable whose colour "
                           "encodes that number (yellow 2, blue 3, red 4) and which ends in the same clamp on both sides.",
    "breakfast_box": "Left: exactly two tangerines and one nectarine. Right: cereal in the upper half, "
                     "banana chips and almonds in the lower half.",
}


def category_files(category: str, index: int, counts: dict[str, int], size: int, seed: int) -> dict[str, bytes]:
    """Every file of one category as ``{relative path: bytes}``."""
    draw = DRAW[category]
    config = defects_config(category, size)
    values = {entry["defect_name"]: entry["pixel_value"] for entry in config}
    files: dict[str, bytes] = {f"{category}/defects_config.json": json.dumps(config, indent=1).encode()}
    files[f"{category}/readme.txt"] = (
        f"Generated by benchmarks/loco_data.py ({size} x {size} px). Logical constraint: {README[category]}\n"
        f"Structural defects: {', '.join(DEFECTS[category]['structural'])}. "
        f"Logical defects: {', '.join(DEFECTS[category]['logical'])}.\n"
    ).encode()

    def rng_for(split: int, number: int) -> np.random.Generator:
        return np.random.default_rng([seed, index, split, number])

    for split, folder, count in ((0, "train/good", counts["train"]), (1, "validation/good", counts["validation"]), (2, "test/good", counts["test_good"])):
        for number in range(count):
            image, _ = draw(rng_for(split, number), size, None)
            files[f"{category}/{folder}/{number:03d}.png"] = _png(_rgb(image))
    minimum = max(4, int(round(MIN_DEFECT_SHARE * size * size)))
    for split, kind in ((3, "structural"), (4, "logical")):
        folder = KINDS[kind]
        types = DEFECTS[category][kind]
        for number in range(counts[f"test_{kind}"]):
            rng = rng_for(split, number)
            defect = types[number % len(types)]
            while True:
                image, regions = draw(rng, size, defect)
                if regions and all(mask.sum() >= (minimum if kind == "structural" else 1) for _, mask in regions):
                    break
            files[f"{category}/test/{folder}/{number:03d}.png"] = _png(_rgb(image))
            for region, (name, mask) in enumerate(regions):
                files[f"{category}/ground_truth/{folder}/{number:03d}/{region:03d}.png"] = _png(np.where(mask, values[name], 0).astype(np.uint8))
    return files


def build(
    root: str | Path,
    train: int = 60,
    validation: int = 20,
    test_good: int = 20,
    test_structural: int = 20,
    test_logical: int = 20,
    size: int = 256,
    seed: int = SEED,
    categories: tuple[str, ...] = CATEGORIES,
) -> dict[str, dict[str, int]]:
    """Write the data set under ``root`` (MVTec LOCO AD layout); returns ``{category: {split: count}}``.

    A root that already holds a build with the same arguments is left as it is. A root that
    holds anything else but an earlier build of this generator is refused (nothing is deleted).
    The build goes to a hidden sibling folder first and is renamed into place when complete.
    """
    root = Path(root)
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; expected some of {CATEGORIES}")
    if train < 1 or size < 32:
        raise ValueError("need at least one training image and a size of at least 32 px")
    counts = {"train": train, "validation": validation, "test_good": test_good, "test_structural": test_structural, "test_logical": test_logical}
    arguments = {"version": VERSION, **counts, "size": size, "seed": seed, "categories": list(categories)}
    summary = {c: dict(counts) for c in categories}
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == arguments:
            return summary
    elif root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {MARKER}: give an empty or new folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for index, category in enumerate(CATEGORIES):
            if category not in categories:
                continue
            for path, content in category_files(category, index, counts, size, seed).items():
                target = staging / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
        (staging / "LICENSE.txt").write_text("Built by benchmarks/loco_data.py: procedural images and defects. Public domain (CC0).\n")
        (staging / MARKER).write_text(json.dumps(arguments, indent=1))
        if root.exists():  # an earlier build (or an empty folder): swap it out, then delete it
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            root.rename(old)
            staging.rename(root)
            shutil.rmtree(old)
        else:
            staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output folder (new or empty, or an earlier build to replace)")
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--validation", type=int, default=20)
    parser.add_argument("--test-good", type=int, default=20)
    parser.add_argument("--test-structural", type=int, default=20)
    parser.add_argument("--test-logical", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--category", action="append", choices=CATEGORIES, help="build only these (repeat)")
    args = parser.parse_args()
    import time

    start = time.perf_counter()
    summary = build(args.root, args.train, args.validation, args.test_good, args.test_structural, args.test_logical,
                    args.size, args.seed, tuple(args.category) if args.category else CATEGORIES)
    for category, counts in summary.items():
        print(f"{Path(args.root) / category}: {counts['train']} train, {counts['validation']} validation, "
              f"{counts['test_good']} good, {counts['test_structural']} structural "
              f"({', '.join(DEFECTS[category]['structural'])}), {counts['test_logical']} logical "
              f"({', '.join(DEFECTS[category]['logical'])}); {args.size}x{args.size} RGB PNG")
    print(f"built in {time.perf_counter() - start:.1f} s; read it with: vad run --dataset mvtec-loco --root {args.root} --category CATEGORY")


if __name__ == "__main__":
    sys.exit(main())
