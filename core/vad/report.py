"""Human-readable outputs of a run: overlays, curves, histograms, raw maps and ``report.html``.

Per category (``<run>/<category>/report/``):

* ``overlays/<n>-<defect>-<stem>.png``: one strip per chosen test image, panels
  original | ground truth | anomaly map over the image | predicted mask at the pixel threshold.
  Which images: every defective image and the highest-scoring good ones (the likely false
  alarms), at most ``max_overlays`` in all (``--set report.max_overlays=N``, see
  :class:`vad.config.ReportOptions`; 0 = all); a
  category with more defective images than that shows the lowest-scoring defective ones
  first (the likely misses) and then the rest in order of score, up to the cap.
* ``<curve>.png``: one plot per curve name that the run's metrics offer
  (:meth:`vad.contracts.Metric.curves`; e.g. ``roc.png`` and ``pro.png`` from vad-metrics), the
  metric's own points with its label in the legend and its integration limit dashed. The
  report knows no metric: it draws whatever :class:`vad.contracts.Curve` it is given.
* ``histogram.png``: scores of good vs defective test images, threshold marked.
* ``index.json``: what was drawn, read by :func:`write_run_report`.

With ``--save-maps``: ``<run>/anomaly_maps/<category>/test/<defect>/<image stem>.tiff``, float32
at each image's original resolution, the layout the official MVTec AD / LOCO evaluation
scripts read.

Per run: ``report.html``, a self-contained page (images referenced by relative paths inside
the run folder; no scripts, no network) with the results table, warnings, and per category
the plots and overlays.

Colours of anomaly maps: the threshold sits at the middle of the colour scale, so red always
means "above the pixel threshold" and a good image stays blue-green. The scale runs from the
category's typical map minimum (median of per-image minima) to ``2 * threshold - minimum``;
without a pixel threshold it spans the category's maps (minimum to 99th percentile of the
per-image maxima).

Speed: everything is drawn with NumPy and PIL (the heat-map colours are matplotlib's "jet"
from a lookup table, the plots PIL line drawings; importing matplotlib alone would cost more
than all of the plots), each plot once per category. The independent jobs (plots, each
overlay strip from decoding its image to its PNG file, each TIFF map) run on a thread pool
with one thread per core: PIL, zlib and file writes release the GIL. Every write is atomic
(:mod:`vad.artifacts`). ``benchmarks/report.py`` times the report within a run.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vad import artifacts
from vad.calibration import false_alarm_warning

if TYPE_CHECKING:
    from vad.config import RunConfig
    from vad.contracts import Curve, EvaluationData
    from vad.model import AnomalyModel, Output

#: Height of each overlay panel in pixels.
PANEL_HEIGHT = 192
REPORT_DIR = "report"
INDEX_JSON = "index.json"
#: The score histogram's plot name (file ``histogram.png``, key in ``index.json``).
HISTOGRAM = "histogram"


# --------------------------------------------------------------------------- images


def color_range(maps_min: float, maps_max: float, threshold: float | None) -> tuple[float, float]:
    """Colour scale ``(low, high)`` with the threshold in the middle when there is one."""
    if threshold is not None and np.isfinite(threshold) and threshold > maps_min:
        return float(maps_min), float(2 * threshold - maps_min)
    high = maps_max if maps_max > maps_min else maps_min + 1.0
    return float(maps_min), float(high)


#: matplotlib's "jet" colour map: (positions, values) of the piecewise-linear red, green, blue.
_JET_SEGMENTS = (
    ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5)),
    ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
    ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0)),
)
#: Its 256 colours as matplotlib tabulates them, RGB uint8.
JET = (np.stack([np.interp(np.linspace(0.0, 1.0, 256), x, y) for x, y in _JET_SEGMENTS], axis=1) * 255).astype(np.uint8)


def _colormap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """RGB uint8 colours of ``values`` on the jet scale from ``low`` to ``high`` (the same
    colours as ``matplotlib.colormaps["jet"]``, without importing matplotlib)."""
    normalised = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    return JET[np.minimum((normalised * len(JET)).astype(np.intp), len(JET) - 1)]


def _resize(image: np.ndarray, height: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    if h == height:
        return image
    width = max(1, round(w * height / h))
    if image.dtype == bool:
        resized = Image.fromarray(image.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        return np.asarray(resized) > 127
    if image.dtype != np.uint8:  # float maps: resize in float
        resized = Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
        return np.asarray(resized)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST if nearest else Image.BILINEAR))


def _blend(image: np.ndarray, color: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    alpha = np.asarray(alpha, np.float32)
    if alpha.ndim == 2:
        alpha = alpha[..., None]
    return (image.astype(np.float32) * (1 - alpha) + color.astype(np.float32) * alpha).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """One-pixel border of a bool mask (pixels with a 4-neighbour outside it, or on the edge)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _labelled(panel: np.ndarray, title: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    bar = 18
    canvas = Image.new("RGB", (panel.shape[1], panel.shape[0] + bar), (255, 255, 255))
    canvas.paste(Image.fromarray(panel), (0, bar))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0))
    return np.asarray(canvas)


def overlay_strip(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    truth: np.ndarray | None,
    pixel_threshold: float | None,
    value_range: tuple[float, float],
    caption: str = "",
    show_truth: bool = True,
    height: int = PANEL_HEIGHT,
) -> np.ndarray:
    """RGB strip: original | ground truth | anomaly map | predicted mask (truth panel optional).

    The ground-truth and predicted-mask panels tint the defect red on the image and outline it;
    without a map (image-level detectors) the map and mask panels are grey with a note.
    """
    from PIL import Image, ImageDraw

    original = _resize(image, height)
    red = np.zeros_like(original)
    red[...] = (255, 0, 0)
    gray = np.full_like(original, 128)
    panels = [_labelled(original, "image")]
    if show_truth:
        if truth is None:
            panels.append(_labelled(_blend(original, gray, 0.6), "no ground truth"))
        else:
            small = _resize(truth.astype(bool), height)
            tinted = _blend(original, red, small * 0.45)
            tinted[_outline(small)] = (255, 255, 0)
            panels.append(_labelled(tinted, "ground truth"))
    if anomaly_map is None:
        panels.append(_labelled(_blend(original, gray, 0.6), "no anomaly map"))
        panels.append(_labelled(_blend(original, gray, 0.6), "no pixel decision"))
    else:
        small_map = _resize(anomaly_map.astype(np.float32), height)
        heat = _colormap(small_map, *value_range)
        panels.append(_labelled(_blend(original, heat, 0.5), "anomaly map"))
        if pixel_threshold is None:
            panels.append(_labelled(_blend(original, gray, 0.6), "no pixel threshold"))
        else:
            predicted = small_map >= pixel_threshold
            tinted = _blend(original, red, predicted * 0.45)
            tinted[_outline(predicted)] = (255, 255, 0)
            panels.append(_labelled(tinted, f"mask >= {pixel_threshold:.4g}"))
    gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
    strip = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
    if caption:
        canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + 18), (255, 255, 255))
        canvas.paste(Image.fromarray(strip), (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0))
        strip = np.asarray(canvas)
    return strip


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an RGB uint8 array at zlib's fastest level: at PIL's default level the
    encoding of the overlays took most of the report's time, for files only about a fifth smaller."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def tiff_bytes(anomaly_map: np.ndarray) -> bytes:
    """A float32 single-channel TIFF."""
    try:
        import tifffile
    except ImportError as error:
        from vad.errors import VadError

        raise VadError("--save-maps writes TIFF files with tifffile: pip install tifffile") from error

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.ascontiguousarray(anomaly_map, dtype=np.float32))
    return buffer.getvalue()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def choose_overlays(outputs: list[Output], limit: int) -> list[int]:
    """Indices of the outputs to draw, in display order: defective ones (in test order), then the
    highest-scoring good ones. Over ``limit``, the lowest-scoring defective ones are kept."""
    defective_all = [i for i, o in enumerate(outputs) if o.sample.label]
    if limit <= 0 or len(outputs) <= limit:
        return defective_all + sorted((i for i, o in enumerate(outputs) if not o.sample.label), key=lambda i: -outputs[i].score)
    defective = sorted((i for i, o in enumerate(outputs) if o.sample.label), key=lambda i: outputs[i].score)
    good = sorted((i for i, o in enumerate(outputs) if not o.sample.label), key=lambda i: -outputs[i].score)
    good_share = min(len(good), max(limit // 4, limit - len(defective)))
    chosen_defective = sorted(defective[: limit - good_share])
    return chosen_defective + good[:good_share]


# --------------------------------------------------------------------------- plots

#: Plots are drawn this many times larger and then reduced: anti-aliased lines and text.
SUPERSAMPLE = 2
#: Plot sizes in pixels (width, height).
CURVE_SIZE, HISTOGRAM_SIZE = (420, 400), (550, 400)
#: matplotlib's "tab10" colours, given to the curves of one plot in turn.
CURVE_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207))
GOOD_COLOR, DEFECTIVE_COLOR, LIMIT_COLOR, BLACK = (44, 160, 44), (214, 39, 40), (128, 128, 128), (0, 0, 0)
#: Opacity of histogram bars (good and defective bars overlap).
BAR_ALPHA = 0.6


def _font(size: int):
    """PIL's built-in font (Aileron) at ``size`` output pixels; its one bitmap size on Pillow
    older than 10.1 or without FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size * SUPERSAMPLE)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _span(values: np.ndarray, padding: float = 0.03) -> tuple[float, float]:
    """The range of the finite ``values``, widened by ``padding`` of its width on each side."""
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    margin = (high - low) * padding
    return low - margin, high + margin


def _ticks(low: float, high: float, count: int = 5, integers: bool = False) -> list[tuple[float, str]]:
    """Round values inside ``[low, high]`` (1, 2 or 5 times a power of ten apart, as close to
    ``count`` of them as that allows; whole numbers only with ``integers``) and their labels."""
    power = 10.0 ** math.floor(math.log10((high - low) / count))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda step: abs((high - low) / step - count))
    if integers:
        step = max(1.0, round(step))
    decimals = max(0, -math.floor(math.log10(step)))
    return [(k * step, f"{k * step:.{decimals}f}") for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _along(points: np.ndarray, spacing: float) -> np.ndarray:
    """Points every ``spacing`` pixels along a polyline: what it covers, for placing the legend."""
    if len(points) < 2:
        return points
    distance = np.r_[0.0, np.cumsum(np.hypot(*np.diff(points, axis=0).T))]
    steps = np.arange(0.0, distance[-1] + spacing, spacing)
    return np.column_stack([np.interp(steps, distance, points[:, 0]), np.interp(steps, distance, points[:, 1])])


class _Plot:
    """One set of axes on a PIL canvas drawn ``SUPERSAMPLE`` times larger than the PNG (every
    coordinate here is a canvas pixel); :meth:`png` adds the frame and the legend and reduces it."""

    def __init__(self, size: tuple[int, int], x_range: tuple[float, float], y_range: tuple[float, float], title: str, x_label: str, y_label: str, integer_y: bool = False) -> None:
        from PIL import Image, ImageDraw

        scale = SUPERSAMPLE
        self.canvas = Image.new("RGBA", (size[0] * scale, size[1] * scale), (255, 255, 255, 255))
        self.draw = ImageDraw.Draw(self.canvas)
        self.font, self.title_font = _font(11), _font(13)
        self.line_height = self._size("Ag", self.font)[1]
        self.x_range, self.y_range = x_range, y_range
        x_ticks, y_ticks = _ticks(*x_range), _ticks(*y_range, integers=integer_y)
        tick = 4 * scale
        widest = max((self._size(label, self.font)[0] for _, label in y_ticks), default=0)
        left = 4 * scale + self.line_height + 8 * scale + widest + tick + 3 * scale
        self.box = (left, 30 * scale, self.canvas.width - 16 * scale, self.canvas.height - 2 * self.line_height - 18 * scale)
        self.legend: list[tuple[str, tuple[int, ...], str]] = []
        self.covered: list[np.ndarray] = []  # canvas points the data covers
        self._axes(title, x_label, y_label, x_ticks, y_ticks, tick)

    def x_pixels(self, x) -> np.ndarray:
        left, _, right, _ = self.box
        low, high = self.x_range
        return left + (np.asarray(x, np.float64) - low) * (right - left) / (high - low)

    def y_pixels(self, y) -> np.ndarray:
        _, top, _, bottom = self.box
        low, high = self.y_range
        return bottom - (np.asarray(y, np.float64) - low) * (bottom - top) / (high - low)

    def _size(self, text: str, font) -> tuple[int, int]:
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    def _text(self, x: float, y: float, text: str, font, align_x: float = 0.5, align_y: float = 0.5) -> None:
        """``text`` placed so that ``(x, y)`` lies at fractions ``(align_x, align_y)`` of its box."""
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=font)
        self.draw.text((x - left - align_x * (right - left), y - top - align_y * (bottom - top)), text, fill=BLACK, font=font)

    def _axes(self, title: str, x_label: str, y_label: str, x_ticks, y_ticks, tick: int) -> None:
        from PIL import Image, ImageDraw

        scale = SUPERSAMPLE
        left, top, right, bottom = self.box
        grid = (232, 232, 232)
        for value, label in x_ticks:
            x = float(self.x_pixels(value))
            self.draw.line([(x, top), (x, bottom)], fill=grid, width=scale)
            self.draw.line([(x, bottom), (x, bottom + tick)], fill=BLACK, width=scale)
            self._text(x, bottom + tick + 3 * scale, label, self.font, 0.5, 0.0)
        for value, label in y_ticks:
            y = float(self.y_pixels(value))
            self.draw.line([(left, y), (right, y)], fill=grid, width=scale)
            self.draw.line([(left - tick, y), (left, y)], fill=BLACK, width=scale)
            self._text(left - tick - 3 * scale, y, label, self.font, 1.0, 0.5)
        self._text((left + right) / 2, 15 * scale, title, self.title_font)
        self._text((left + right) / 2, self.canvas.height - 6 * scale, x_label, self.font, 0.5, 1.0)
        width, height = self._size(y_label, self.font)
        text_left, text_top, _, _ = self.draw.textbbox((0, 0), y_label, font=self.font)
        turned = Image.new("RGBA", (width + 2, height + 2), (255, 255, 255, 0))
        ImageDraw.Draw(turned).text((-text_left, -text_top), y_label, fill=BLACK, font=self.font)
        turned = turned.rotate(90, expand=True)
        self.canvas.alpha_composite(turned, (4 * scale, max(0, int((top + bottom - turned.height) / 2))))

    def line(self, x, y, color: tuple[int, int, int], label: str = "") -> None:
        """A polyline through the finite points (consecutive points on one canvas pixel merged)."""
        x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
        finite = np.isfinite(x) & np.isfinite(y)
        points = np.rint(np.column_stack([self.x_pixels(x[finite]), self.y_pixels(y[finite])])).astype(np.int64)
        if not len(points):
            return
        points = points[np.r_[True, np.any(points[1:] != points[:-1], axis=1)]]
        width = 2 * SUPERSAMPLE
        if len(points) == 1:
            (px, py), = points
            self.draw.ellipse([px - width, py - width, px + width, py + width], fill=color)
        else:
            self.draw.line(points.ravel().tolist(), fill=color, width=width, joint="curve")
        self.covered.append(_along(points.astype(np.float64), 6 * SUPERSAMPLE))
        if label:
            self.legend.append(("line", color, label))

    def dashed_vline(self, x: float, color: tuple[int, int, int], label: str = "") -> None:
        """A dashed vertical line across the axes at ``x``."""
        _, top, _, bottom = self.box
        position = float(self.x_pixels(x))
        dash, gap = 6 * SUPERSAMPLE, 4 * SUPERSAMPLE
        for start in range(int(top), int(bottom), dash + gap):
            self.draw.line([(position, start), (position, min(start + dash, bottom))], fill=color, width=3)
        self.covered.append(_along(np.array([[position, top], [position, bottom]], np.float64), 6 * SUPERSAMPLE))
        if label:
            self.legend.append(("dashed", color, label))

    def bars(self, edges: np.ndarray, counts: np.ndarray, color: tuple[int, int, int], label: str) -> None:
        """Histogram bars, ``BAR_ALPHA`` opaque over what is drawn already."""
        from PIL import Image, ImageDraw

        layer = Image.new("RGBA", self.canvas.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        x, tops, base = self.x_pixels(edges), self.y_pixels(counts), float(self.y_pixels(0.0))
        for x0, x1, top, count in zip(x[:-1], x[1:], tops, counts):
            if count > 0:
                draw.rectangle([x0, top, x1, base], fill=(*color, round(255 * BAR_ALPHA)))
                self.covered.append(_along(np.array([[(x0 + x1) / 2, top], [(x0 + x1) / 2, base]]), 6 * SUPERSAMPLE))
        self.canvas.alpha_composite(layer)
        self.legend.append(("patch", tuple(round(c * BAR_ALPHA + 255 * (1 - BAR_ALPHA)) for c in color), label))

    def _draw_legend(self) -> None:
        """The legend in the corner of the axes that covers the fewest data points."""
        scale = SUPERSAMPLE
        pad, sample, gap, spacing = 6 * scale, 22 * scale, 6 * scale, 5 * scale
        width = 2 * pad + sample + gap + max(self._size(label, self.font)[0] for _, _, label in self.legend)
        height = 2 * pad + len(self.legend) * (self.line_height + spacing) - spacing
        left, top, right, bottom = self.box
        inset = 8 * scale
        corners = [(right - inset - width, bottom - inset - height), (right - inset - width, top + inset), (left + inset, top + inset), (left + inset, bottom - inset - height)]
        points = np.concatenate(self.covered) if self.covered else np.zeros((0, 2))

        def covered(corner: tuple[float, float]) -> int:
            x, y = corner
            return int(np.count_nonzero((points[:, 0] >= x) & (points[:, 0] <= x + width) & (points[:, 1] >= y) & (points[:, 1] <= y + height)))

        x, y = min(corners, key=covered)
        self.draw.rounded_rectangle([x, y, x + width, y + height], radius=3 * scale, fill=(255, 255, 255), outline=(204, 204, 204), width=scale)
        for row, (kind, color, label) in enumerate(self.legend):
            middle = y + pad + row * (self.line_height + spacing) + self.line_height / 2
            start = x + pad
            if kind == "patch":
                self.draw.rectangle([start, middle - 4 * scale, start + sample, middle + 4 * scale], fill=color)
            elif kind == "dashed":
                for offset in (0, 14 * scale):
                    self.draw.line([(start + offset, middle), (start + offset + 8 * scale, middle)], fill=color, width=3)
            else:
                self.draw.line([(start, middle), (start + sample, middle)], fill=color, width=2 * scale)
            self._text(start + sample + gap, middle, label, self.font, 0.0, 0.5)

    def png(self) -> bytes:
        """The finished plot (frame, legend) at its output size, PNG-encoded."""
        self.draw.rectangle(self.box, outline=BLACK, width=SUPERSAMPLE)
        if self.legend:
            self._draw_legend()
        return png_bytes(np.asarray(self.canvas.convert("RGB").reduce(SUPERSAMPLE)))


def curves_png(curves: Sequence[Curve], title: str) -> bytes:
    """Curves on one set of axes (labels and axis titles from the curves; the first curve's
    axis titles), each with its label in the legend, their integration limits dashed."""
    limits = sorted({curve.x_limit for curve in curves if curve.x_limit is not None})
    xs = np.concatenate([np.asarray(curve.x, np.float64).ravel() for curve in curves] + [np.asarray(limits, np.float64)])
    ys = np.concatenate([np.asarray(curve.y, np.float64).ravel() for curve in curves])
    plot = _Plot(CURVE_SIZE, _span(xs), _span(ys), title, curves[0].x_label, curves[0].y_label)
    for limit in limits:
        plot.dashed_vline(limit, LIMIT_COLOR)
    for number, curve in enumerate(curves):
        plot.line(curve.x, curve.y, CURVE_COLORS[number % len(CURVE_COLORS)], curve.label)
    return plot.png()


def intervals_png(centres: Sequence[float], lows: Sequence[float], highs: Sequence[float], title: str, x_label: str) -> bytes:
    """A forest plot: row ``i`` (1, 2, ... from the bottom) has its interval ``[low, high]`` and
    its centre; green when the interval lies above 0, red below, grey across it."""
    centres, lows, highs = (np.asarray(v, np.float64) for v in (centres, lows, highs))
    count = len(centres)
    plot = _Plot((560, 110 + 16 * count), _span(np.r_[lows, highs, 0.0], 0.05), (0.4, count + 0.6), title, x_label, "row", integer_y=True)
    plot.dashed_vline(0.0, LIMIT_COLOR, "no difference")
    for row, (centre, low, high) in enumerate(zip(centres, lows, highs), 1):
        color = GOOD_COLOR if low > 0 else DEFECTIVE_COLOR if high < 0 else LIMIT_COLOR
        plot.line([low, high], [row, row], color)
        plot.line([centre], [row], BLACK)
    return plot.png()


def histogram_png(scores: np.ndarray, labels: np.ndarray, threshold: float | None, title: str) -> bytes:
    """Score histograms of good vs defective test images with the image threshold."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(bool)
    finite = np.isfinite(scores)
    values = np.r_[scores[finite], [threshold] if threshold is not None else []]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if high - low <= 1e-9 * max(1.0, abs(high)):  # equal scores (a threshold an ulp above them): numpy finds no 30 bins
        low, high = low - 0.5 * max(1.0, abs(low)), high + 0.5 * max(1.0, abs(high))
    edges = np.histogram_bin_edges(values, bins=30, range=(low, high))
    good = np.histogram(scores[finite & ~labels], edges)[0]
    defective = np.histogram(scores[finite & labels], edges)[0]
    highest = max(int(good.max()), int(defective.max()), 1)
    plot = _Plot(HISTOGRAM_SIZE, _span(edges, 0.02), (0.0, highest * 1.05), title, "anomaly score", "test images", integer_y=True)
    plot.bars(edges, good, GOOD_COLOR, f"good ({int((~labels).sum())})")
    plot.bars(edges, defective, DEFECTIVE_COLOR, f"defective ({int(labels.sum())})")
    if threshold is not None:
        plot.dashed_vline(threshold, BLACK, f"threshold {threshold:.4g}")
    return plot.png()


def curves_by_name(curves: Sequence[Curve]) -> dict[str, list[Curve]]:
    """The curves grouped by name (one plot each), in the order the names first come."""
    groups: dict[str, list[Curve]] = {}
    for curve in curves:
        groups.setdefault(curve.name, []).append(curve)
    return groups


# --------------------------------------------------------------------------- per category


def map_value_range(maps: list[np.ndarray], threshold: float | None) -> tuple[float, float]:
    """The colour scale of a set of maps (see the module docstring)."""
    minima = np.array([float(np.min(m)) for m in maps])
    maxima = np.array([float(np.max(m)) for m in maps])
    return color_range(float(np.median(minima)), float(np.percentile(maxima, 99)), threshold)


def map_files(category: str, outputs: list[Output]) -> list[tuple[str, np.ndarray]]:
    """Relative paths of the raw maps in the official evaluation layout, with the maps."""
    files, used = [], set()
    for output in outputs:
        if output.map is None:
            continue
        defect = _safe_name(output.sample.defect_type or ("good" if not output.sample.label else "defect"))
        relative = f"anomaly_maps/{category}/test/{defect}/{_stem(output.sample.path)}.tiff"
        if relative in used:  # two sources with one stem (e.g. LOCO views): keep both
            relative = f"anomaly_maps/{category}/test/{defect}/{_safe_name(output.sample.path)}.tiff"
        used.add(relative)
        files.append((relative, output.map))
    return files


def _worker_count() -> int:
    """One thread per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_drawing(path: Path, draw: Callable[..., bytes], *arguments: Any) -> None:
    """Write ``draw(*arguments)`` to ``path`` (a thread-pool job: drawing, encoding, writing)."""
    artifacts.atomic_write_bytes(path, draw(*arguments))


def _write_overlay(
    path: Path, output: Output, masks: Sequence[np.ndarray | None] | None, position: int, pixel_threshold: float | None, value_range: tuple[float, float], caption: str
) -> None:
    """One overlay strip, from decoding its image (once) to its PNG file; the ground truth is
    ``masks[position]``, or the sample's own mask without ``masks``."""
    image = output.sample.load_image()
    truth = masks[position] if masks is not None else output.sample.load_mask()
    if truth is None and not output.sample.label:  # a good image without a mask file: nothing to mark
        truth = np.zeros(image.shape[:2], bool)
    artifacts.atomic_write_bytes(path, png_bytes(overlay_strip(image, output.map, truth, pixel_threshold, value_range, caption)))


def write_category_report(
    folder: Path,
    data: EvaluationData,
    outputs: list[Output],
    model: AnomalyModel,
    config: RunConfig,
    curves: Sequence[Curve] = (),
    calibration: dict[str, Any] | None = None,
) -> None:
    """Plots of the metrics' ``curves`` and of the scores, overlays, raw TIFF maps
    (``--save-maps``) and ``index.json``; the files are drawn and written on a thread pool."""
    folder = Path(folder)
    category = folder.name
    report_folder = folder / REPORT_DIR
    from vad.config import ReportOptions

    limit = ReportOptions.parse(config.options_for("report"), owner="report").max_overlays
    index: dict[str, Any] = {
        "category": category,
        "images": len(outputs),
        "image_threshold": model.image_threshold,
        "pixel_threshold": model.pixel_threshold,
        "produces_maps": model.produces_maps,
        "plots": {},
        "overlays": [],
        "notes": [],
        "skipped_images": [[s.path, s.reason] for s in getattr(model, "skipped", [])],
        "calibration": calibration or {},
    }
    roi = getattr(model, "roi", None)
    if roi is not None:
        how = "painted over before the detector" if roi.mode == "before" else "left out of the image score"
        index["notes"].append(
            f"region of interest ({roi.mode}): {100 * float(roi.mask.mean()):.1f} % of each image is inspected, the rest is {how}; "
            "pixel metrics count the pixels inside it only"
        )
    if not outputs:
        index["notes"].append("no test image could be scored")
        artifacts.atomic_write_json(report_folder / INDEX_JSON, index)
        return
    if not curves:
        index["notes"].append("no metric of this run offers a curve to draw")
    maps = [o.map for o in outputs] if model.produces_maps and all(o.map is not None for o in outputs) else None
    if maps is None:
        index["notes"].append("the detector gives image scores only: no anomaly maps, overlays show the image alone")
    value_range = map_value_range(maps, model.pixel_threshold) if maps is not None else (0.0, 1.0)
    index["color_range"] = list(value_range)

    with ThreadPoolExecutor(max_workers=_worker_count(), thread_name_prefix="vad-report") as pool:
        jobs: list[Future] = []
        for name, group in curves_by_name(curves).items():
            index["plots"][name] = f"{REPORT_DIR}/{_safe_name(name)}.png"
            jobs.append(pool.submit(_write_drawing, folder / index["plots"][name], curves_png, group, f"{category}: {name}"))
        index["plots"][HISTOGRAM] = f"{REPORT_DIR}/{HISTOGRAM}.png"
        scores = np.array([o.score for o in outputs], np.float64)
        labels = np.array([o.sample.label for o in outputs], np.int64)
        jobs.append(pool.submit(_write_drawing, folder / index["plots"][HISTOGRAM], histogram_png, scores, labels, model.image_threshold, f"{category}: scores"))
        for rank, position in enumerate(choose_overlays(outputs, limit)):
            output = outputs[position]
            sample = output.sample
            decision = "n/a" if output.anomalous is None else ("ANOMALOUS" if output.anomalous else "good")
            caption = f"{sample.defect_type}  score {output.score:.4g}  decision {decision}"
            name = f"overlays/{rank:03d}-{_safe_name(sample.defect_type)}-{_safe_name(_stem(sample.path))}.png"
            jobs.append(pool.submit(_write_overlay, report_folder / name, output, data.masks, position, model.pixel_threshold, value_range, caption))
            index["overlays"].append(
                {
                    "file": f"{REPORT_DIR}/{name}",
                    "path": sample.path,
                    "defect_type": sample.defect_type,
                    "label": int(sample.label),
                    "score": float(output.score),
                    "anomalous": output.anomalous,
                }
            )
        if config.save_maps and maps is not None:
            files = map_files(category, outputs)
            index["anomaly_maps"] = [relative for relative, _ in files]
            jobs += [pool.submit(_write_drawing, folder.parent / relative, tiff_bytes, anomaly_map) for relative, anomaly_map in files]
        elif config.save_maps:
            index["notes"].append("--save-maps: the detector gives no anomaly maps, no TIFF written")
        try:
            for job in jobs:
                job.result()
        except BaseException:  # the first failure (or an interrupt): drop the jobs not started
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if len(index["overlays"]) < len(outputs):
        index["notes"].append(
            f"overlays for {len(index['overlays'])} of {len(outputs)} test images: every defective image "
            f"and the highest-scoring good ones, at most {limit} (--set report.max_overlays=0 draws all)"
        )
    artifacts.atomic_write_json(report_folder / INDEX_JSON, index)


# --------------------------------------------------------------------------- per run

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}tr.mean td{font-weight:bold;background:#f4f4f4}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:8px 0}
.note{color:#555;font-size:.9em}.plots img{height:300px;margin-right:8px}
.overlays{display:flex;flex-wrap:wrap;gap:10px}.overlays img{max-width:100%}
code{background:#f4f4f4;padding:1px 4px}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_warnings(folder: Path, config: RunConfig, metrics: dict[str, Any] | None) -> list[str]:
    """What a reader must know before trusting the numbers."""
    warnings = []
    if not config.pretrained:
        warnings.append("Backbones were RANDOMLY INITIALISED (--no-pretrained): the scores are not meaningful for comparison.")
    metrics = metrics or {}
    for category, skipped in (metrics.get("skipped_metrics") or {}).items():
        for name, reason in skipped.items():
            warnings.append(f"[{category}] metric {name} skipped: {reason}")
    for category, files in (metrics.get("skipped_files") or {}).items():
        shown = ", ".join(f"{f[0]} ({f[1]})" for f in files[:10])
        warnings.append(f"[{category}] {len(files)} unusable file(s) left out (--skip-bad): {shown}" + (" ..." if len(files) > 10 else ""))
    for category, thresholds in (metrics.get("thresholds") or {}).items():
        if thresholds.get("image") is None:
            warnings.append(f"[{category}] no image threshold: decisions are left out")
    for category, calibration in (metrics.get("calibration") or {}).items():
        warning = false_alarm_warning(calibration)
        if warning:
            warnings.append(f"[{category}] {warning}")
    return warnings


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def describe_calibration(calibration: dict[str, Any]) -> str:
    """One sentence: how the threshold was calibrated, on how many normal scores, the
    false-alarm rate it implies (with its interval) and the rate observed on the test normals."""
    method = calibration.get("method")
    if not method:
        return ""
    if method == "none":
        return "Thresholds given, not calibrated on scores."
    folds = f" ({calibration['folds']} folds)" if calibration.get("folds") else ""
    text = f"Thresholds calibrated by {method}{folds} on {calibration.get('scores', 0)} normal image scores"
    estimate = calibration.get("image_false_alarm") or {}
    if estimate.get("expected") is not None:
        confidence = round(100 * estimate["confidence"])
        text += (
            f"; expected false-alarm rate on normal parts {_percent(estimate['expected'])} "
            f"({confidence} % interval {_percent(estimate['low'])} to {_percent(estimate['high'])})"
        )
    on_test = calibration.get("test_false_alarm_range")
    if on_test:
        text += f"; on these {on_test['normals']} good test images expect {_percent(on_test['low'])} to {_percent(on_test['high'])}"
        text += f", observed {_percent(calibration['test_false_alarm_observed'])}"
    return text + "."


def decisions_html(decisions: dict[str, dict[str, Any]]) -> str:
    """One category's decision table (:mod:`vad.decisions`): a row per threshold rule."""
    from vad.decisions import COLUMNS

    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["rule", *COLUMNS])
    rows = [
        f"<tr><td>{html.escape(rule)}</td>" + "".join(f"<td>{_fmt(values.get(c))}</td>" for c in COLUMNS) + "</tr>"
        + (f'<tr><td colspan="{len(COLUMNS) + 1}" class="note">{html.escape(values["note"])}</td></tr>' if values.get("note") else "")
        for rule, values in decisions.items()
    ]
    return (
        '<h3>Decisions</h3><p class="note">What each threshold rule decides on the test images (rules refitted on the '
        "same normal calibration scores; the F1-optimal row reads the test labels, an upper bound; the baseline flags "
        "nothing)</p><table><tr>" + head + "</tr>" + "".join(rows) + "</table>"
    )


def render_html(folder: Path, config: RunConfig) -> str:
    """The report page for the run folder ``folder`` (reads the files the run wrote)."""
    metrics = _read_json(folder / "metrics.json") or {}
    table = _read_json(folder / "results.json") or {"columns": [], "rows": {}}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vad report: {html.escape(folder.name)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>vad run report: {html.escape(folder.name)}</h1>",
        '<p class="note">'
        + " &middot; ".join(
            html.escape(f"{key}: {value}")
            for key, value in [
                ("dataset", config.dataset),
                ("detectors", ", ".join(config.detectors)),
                ("backbones", ", ".join(config.backbones) or "none"),
                ("ensemble", config.ensemble or "none"),
                ("threshold", config.threshold),
                ("seed", config.seed),
            ]
        )
        + ' &middot; <a href="config.yaml">config.yaml</a> &middot; <a href="metrics.json">metrics.json</a> &middot; <a href="results.csv">results.csv</a></p>',
    ]
    for warning in run_warnings(folder, config, metrics):
        parts.append(f'<div class="warn">{html.escape(warning)}</div>')
    columns, rows = table.get("columns", []), table.get("rows", {})
    parts.append("<h2>Results</h2><table><tr><th>category</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
    for category, row in rows.items():
        css = ' class="mean"' if category == "mean" else ""
        parts.append(f"<tr{css}><td>{html.escape(category)}</td>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>")
    parts.append("</table>")
    for machine, decisions in (metrics.get("shot_decisions") or {}).items():
        parts.append(f"<h2>Shots of {html.escape(machine)}: all views together</h2>")
        parts.append('<p class="note">A shot is anomalous when any view shows an anomaly, and flagged when any view\'s score reaches that view\'s threshold of the rule.</p>')
        parts.append(decisions_html(decisions))
    for category in rows:
        if category == "mean":
            continue
        index = _read_json(folder / category / REPORT_DIR / INDEX_JSON)
        parts.append(f'<h2 id="{html.escape(category)}">{html.escape(category)}</h2>')
        if index is None:
            parts.append('<p class="note">no report files for this category</p>')
            continue
        thresholds = f"image threshold {_fmt(index.get('image_threshold'))}, pixel threshold {_fmt(index.get('pixel_threshold'))}"
        parts.append(f'<p class="note">{index["images"]} test images; {thresholds}; <a href="{html.escape(category)}/scores.csv">scores.csv</a></p>')
        calibration_text = describe_calibration(index.get("calibration") or {})
        if calibration_text:
            parts.append(f'<p class="note">{html.escape(calibration_text)}</p>')
        decisions = (metrics.get("decisions") or {}).get(category) or {}
        if decisions:
            parts.append(decisions_html(decisions))
        for path, reason in index.get("skipped_images", []):
            parts.append(f'<div class="warn">unreadable image skipped: {html.escape(path)} ({html.escape(reason)})</div>')
        for note in index.get("notes", []):
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append('<div class="plots">')
        for key, file in index.get("plots", {}).items():
            parts.append(f'<img src="{html.escape(f"{category}/{file}")}" alt="{html.escape(f"{category} {key}")}">')
        parts.append("</div>")
        if index.get("overlays"):
            parts.append("<h3>Heat maps</h3><p class=\"note\">image | ground truth | anomaly map | predicted mask at the pixel threshold</p>")
            parts.append('<div class="overlays">')
            for overlay in index["overlays"]:
                source = html.escape(f"{category}/{overlay['file']}")
                parts.append(f'<img src="{source}" alt="{html.escape(overlay["path"])}">')
            parts.append("</div>")
        if index.get("anomaly_maps"):
            parts.append(f'<p class="note">{len(index["anomaly_maps"])} raw maps (float32 TIFF) under <code>anomaly_maps/{html.escape(category)}/</code></p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_tables_html(title: str, note: str, sections: Sequence[tuple[str, str, Sequence[str], Iterable[Sequence[Any]]]], plots: Sequence[tuple[str, str]]) -> str:
    """A report page of tables, then plots: ``sections`` are ``(heading, note, columns, rows)``,
    ``plots`` ``(file, caption)`` with the files beside the page; notes are HTML (``vad bench``'s
    report.html)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{note}</p>',
    ]
    for heading, section_note, columns, rows in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if section_note:
            parts.append(f'<p class="note">{section_note}</p>')
        parts.append(_html_table(columns, rows))
    for file, caption in plots:
        parts.append(f'<h2>{html.escape(caption)}</h2><img src="{html.escape(file)}" alt="{html.escape(caption)}">')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_run_report(folder: Path, results: list[Any], config: RunConfig) -> None:
    """``report.html``: results table, warnings, and per category the plots and overlays."""
    folder = Path(folder)
    artifacts.atomic_write_text(folder / "report.html", render_html(folder, config))
