"""Human-readable outputs of a run: overlays, curves, histograms, raw maps and ``report.html``.

Per category (``<run>/<category>/report/``):

* ``overlays/<n>-<defect>-<stem>.png``: one strip per chosen test image, panels
  original | ground truth | anomaly map over the image | predicted mask at the pixel threshold.
  Which images: every defective image and the highest-scoring good ones (the likely false
  alarms), at most ``MAX_OVERLAYS`` in all (``--set report.max_overlays=N``; 0 = all); a
  category with more defective images than that shows the lowest-scoring defective ones
  first (the likely misses) and then the rest in order of score, up to the cap.
* ``roc.png`` (image level), ``pro.png`` (per-region overlap vs pixel FPR, integration limit
  0.3 marked), ``histogram.png`` (scores of good vs defective test images, threshold marked).
  The curves are drawn from the run's outputs with NumPy; the official numbers are those in
  ``metrics.json``. For speed the PRO curve is drawn from maps subsampled to at most
  ``PRO_PIXELS`` pixels in all (the area printed in its legend is therefore approximate).
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
per-image maxima). Plots use matplotlib's object API with its Agg canvas (no pyplot, so the
caller's backend is left alone). Every write is atomic (:mod:`vad.artifacts`).
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vad import artifacts

if TYPE_CHECKING:
    from vad.config import RunConfig
    from vad.contracts import EvaluationData, Sample
    from vad.model import AnomalyModel, Output

#: Overlay strips per category unless ``--set report.max_overlays=N`` (0 = every test image).
MAX_OVERLAYS = 32
#: Pixels (all images together) used to draw the PRO curve.
PRO_PIXELS = 4_000_000
#: Height of each overlay panel in pixels.
PANEL_HEIGHT = 192
#: Integration limit of AU-PRO (false positive rate).
PRO_FPR_LIMIT = 0.3
REPORT_DIR = "report"
INDEX_JSON = "index.json"


# --------------------------------------------------------------------------- curves


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score (descending), and the thresholds.

    Starts at (0, 0); ties are one step, as in scikit-learn. Needs both classes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    positives, negatives = max(labels.sum(), 1), max((~labels).sum(), 1)
    fpr = np.r_[0.0, fps / negatives]
    tpr = np.r_[0.0, tps / positives]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]]


def trapezoid_area(x: np.ndarray, y: np.ndarray, limit: float | None = None) -> float:
    """Area under ``y(x)`` (x ascending) up to ``limit``, interpolating the last segment."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if limit is not None:
        inside = x <= limit
        if not inside.all():
            cut = int(np.argmin(inside))
            if cut > 0:
                x0, x1, y0, y1 = x[cut - 1], x[cut], y[cut - 1], y[cut]
                y_at = y0 if x1 == x0 else y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                x, y = np.r_[x[:cut], limit], np.r_[y[:cut], y_at]
            else:
                return 0.0
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def pro_curve(maps: list[np.ndarray], regions: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel FPR and mean per-region overlap for every threshold (exact, by sorting pixels).

    ``regions[i]`` holds the bool masks of image ``i``'s defects (empty for good images); a
    pixel outside every region of its image is a negative. Each region adds ``1 / area`` per
    detected pixel, so the cumulative sum divided by the number of regions is the mean overlap.
    """
    values, negative, weight = [], [], []
    count = 0
    for anomaly_map, masks in zip(maps, regions):
        inside = np.zeros(anomaly_map.shape, bool)
        pixel_weight = np.zeros(anomaly_map.shape, np.float64)
        for mask in masks:
            area = mask.sum()
            if area == 0:
                continue
            pixel_weight[mask] += 1.0 / area
            inside |= mask
            count += 1
        values.append(anomaly_map.ravel())
        negative.append(~inside.ravel())
        weight.append(pixel_weight.ravel())
    if count == 0:
        raise ValueError("no defect regions: the PRO curve needs anomalous pixels")
    values_all = np.concatenate(values)
    order = np.argsort(-values_all, kind="mergesort")
    negative_all = np.concatenate(negative)[order]
    weight_all = np.concatenate(weight)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(values_all[order])), values_all.size - 1]
    fpr = np.cumsum(negative_all)[last_of_tie] / max(1, negative_all.sum())
    pro = np.cumsum(weight_all)[last_of_tie] / count
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def _regions_of(sample: Sample, mask: np.ndarray | None) -> list[np.ndarray]:
    """Defect regions: LOCO annotations when given, else connected components of the mask."""
    if sample.regions:
        return [region.load_mask() for region in sample.regions]
    if mask is None or not mask.any():
        return []
    try:
        from scipy import ndimage
    except ImportError:  # without scipy the whole mask counts as one region (curve only)
        return [mask]
    labelled, number = ndimage.label(mask, structure=np.ones((3, 3), int))
    return [labelled == index for index in range(1, number + 1)]


def _subsample(array: np.ndarray, step: int) -> np.ndarray:
    return array[::step, ::step] if step > 1 else array


# --------------------------------------------------------------------------- images


def color_range(maps_min: float, maps_max: float, threshold: float | None) -> tuple[float, float]:
    """Colour scale ``(low, high)`` with the threshold in the middle when there is one."""
    if threshold is not None and np.isfinite(threshold) and threshold > maps_min:
        return float(maps_min), float(2 * threshold - maps_min)
    high = maps_max if maps_max > maps_min else maps_min + 1.0
    return float(maps_min), float(high)


def _colormap(values: np.ndarray, low: float, high: float) -> np.ndarray:
    try:
        from matplotlib import colormaps
    except ImportError as error:
        from vad.errors import VadError

        raise VadError("the heat-map overlays use matplotlib's colour maps: pip install matplotlib (or pass --no-report)") from error

    normalised = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    return (colormaps["jet"](normalised)[..., :3] * 255).astype(np.uint8)


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
    """PNG encoding of an RGB uint8 array."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
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


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float):
    """A matplotlib Figure and its axes, without pyplot: no global backend switch, no GUI."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        from vad.errors import VadError

        raise VadError("the run report draws its plots with matplotlib: pip install matplotlib (or pass --no-report)") from error
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def roc_png(scores: np.ndarray, labels: np.ndarray, category: str) -> bytes:
    """Image-level ROC curve with its area."""
    fpr, tpr, _ = roc_curve(scores, labels)
    figure, axis = _figure(4.2, 4)
    axis.plot(fpr, tpr, lw=2, label=f"AUROC {trapezoid_area(fpr, tpr):.4f}")
    axis.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{category}: image ROC", xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    return _figure_png(figure)


def pro_png(fpr: np.ndarray, pro: np.ndarray, category: str) -> bytes:
    """PRO curve with the FPR <= 0.3 integration limit and the normalised area."""
    area = trapezoid_area(fpr, pro, PRO_FPR_LIMIT) / PRO_FPR_LIMIT
    figure, axis = _figure(4.2, 4)
    axis.plot(fpr, pro, lw=2, label=f"AU-PRO(0.3) ~ {area:.4f}")
    axis.axvline(PRO_FPR_LIMIT, ls="--", c="grey", lw=1)
    axis.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title=f"{category}: PRO curve", xlim=(0, 1), ylim=(0, 1.01))
    axis.legend(loc="lower right")
    return _figure_png(figure)


def histogram_png(scores: np.ndarray, labels: np.ndarray, threshold: float | None, category: str) -> bytes:
    """Score histograms of good vs defective test images with the image threshold."""
    labels = np.asarray(labels).astype(bool)
    finite = scores[np.isfinite(scores)]
    edges = np.histogram_bin_edges(np.r_[finite, [threshold] if threshold is not None else []], bins=30)
    figure, axis = _figure(5.5, 4)
    axis.hist(scores[~labels], bins=edges, alpha=0.6, color="tab:green", label=f"good ({(~labels).sum()})")
    axis.hist(scores[labels], bins=edges, alpha=0.6, color="tab:red", label=f"defective ({labels.sum()})")
    if threshold is not None:
        axis.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
    axis.set(xlabel="anomaly score", ylabel="test images", title=f"{category}: scores")
    axis.legend()
    return _figure_png(figure)


# --------------------------------------------------------------------------- per category


def _report_options(config: RunConfig) -> dict[str, Any]:
    return config.options_for("report")


def map_value_range(maps: list[np.ndarray], threshold: float | None) -> tuple[float, float]:
    """The colour scale of a set of maps (see the module docstring)."""
    minima = np.array([float(np.min(m)) for m in maps])
    maxima = np.array([float(np.max(m)) for m in maps])
    return color_range(float(np.median(minima)), float(np.percentile(maxima, 99)), threshold)


def write_maps(run_folder: Path, category: str, outputs: list[Output]) -> list[str]:
    """Raw maps as float32 TIFF in the official evaluation layout; returns relative paths."""
    written, used = [], set()
    for output in outputs:
        if output.map is None:
            continue
        defect = _safe_name(output.sample.defect_type or ("good" if not output.sample.label else "defect"))
        stem = _stem(output.sample.path)
        relative = f"anomaly_maps/{category}/test/{defect}/{stem}.tiff"
        if relative in used:  # two sources with one stem (e.g. LOCO views): keep both
            relative = f"anomaly_maps/{category}/test/{defect}/{_safe_name(output.sample.path)}.tiff"
        used.add(relative)
        artifacts.atomic_write_bytes(run_folder / relative, tiff_bytes(output.map))
        written.append(relative)
    return written


def write_category_report(folder: Path, data: EvaluationData, outputs: list[Output], model: AnomalyModel, config: RunConfig) -> None:
    """Overlays, ROC / PRO curves, score histogram, raw TIFF maps (``--save-maps``), ``index.json``."""
    folder = Path(folder)
    category = folder.name
    report_folder = folder / REPORT_DIR
    options = _report_options(config)
    limit = int(options.get("max_overlays", MAX_OVERLAYS))
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
    }
    if not outputs:
        index["notes"].append("no test image could be scored")
        artifacts.atomic_write_json(report_folder / INDEX_JSON, index)
        return
    scores = np.array([o.score for o in outputs], np.float64)
    labels = np.array([o.sample.label for o in outputs], np.int64)

    plots: dict[str, str] = {}
    if labels.min() != labels.max():
        artifacts.atomic_write_bytes(report_folder / "roc.png", roc_png(scores, labels, category))
        plots["roc"] = f"{REPORT_DIR}/roc.png"
    else:
        index["notes"].append("ROC curve left out: the test set holds one class only")
    artifacts.atomic_write_bytes(report_folder / "histogram.png", histogram_png(scores, labels, model.image_threshold, category))
    plots["histogram"] = f"{REPORT_DIR}/histogram.png"

    maps = [o.map for o in outputs] if model.produces_maps and all(o.map is not None for o in outputs) else None
    masks = list(data.masks) if data.masks is not None else [o.sample.load_mask() for o in outputs]
    if maps is not None:
        total = sum(m.size for m in maps)
        step = int(np.ceil(np.sqrt(total / PRO_PIXELS))) if total > PRO_PIXELS else 1
        regions = [[_subsample(r, step) for r in _regions_of(o.sample, mask)] for o, mask in zip(outputs, masks)]
        if any(regions):
            fpr, pro = pro_curve([_subsample(m, step) for m in maps], regions)
            artifacts.atomic_write_bytes(report_folder / "pro.png", pro_png(fpr, pro, category))
            plots["pro"] = f"{REPORT_DIR}/pro.png"
        else:
            index["notes"].append("PRO curve left out: no pixel ground truth")
    else:
        index["notes"].append("the detector gives image scores only: no anomaly maps, overlays show the image alone")
    index["plots"] = plots

    value_range = map_value_range(maps, model.pixel_threshold) if maps is not None else (0.0, 1.0)
    index["color_range"] = list(value_range)
    for rank, position in enumerate(choose_overlays(outputs, limit)):
        output = outputs[position]
        sample = output.sample
        decision = "n/a" if output.anomalous is None else ("ANOMALOUS" if output.anomalous else "good")
        caption = f"{sample.defect_type}  score {output.score:.4g}  decision {decision}"
        truth = masks[position]
        if truth is None and not sample.label:  # a good image without a mask file: nothing to mark
            truth = np.zeros(sample.load_image().shape[:2] if output.map is None else output.map.shape, bool)
        strip = overlay_strip(sample.load_image(), output.map, truth, model.pixel_threshold, value_range, caption)
        name = f"overlays/{rank:03d}-{_safe_name(sample.defect_type)}-{_safe_name(_stem(sample.path))}.png"
        artifacts.atomic_write_bytes(report_folder / name, png_bytes(strip))
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
    if len(index["overlays"]) < len(outputs):
        index["notes"].append(
            f"overlays for {len(index['overlays'])} of {len(outputs)} test images: every defective image "
            f"and the highest-scoring good ones, at most {limit} (--set report.max_overlays=0 draws all)"
        )
    if config.save_maps and maps is not None:
        index["anomaly_maps"] = write_maps(folder.parent, category, outputs)
    elif config.save_maps:
        index["notes"].append("--save-maps: the detector gives no anomaly maps, no TIFF written")
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
    files = metrics.get("dataset_skipped_files") or []
    if files:
        warnings.append(f"{len(files)} unreadable data set file(s) skipped: " + ", ".join(str(f[0]) for f in files[:10]) + (" ..." if len(files) > 10 else ""))
    for category, thresholds in (metrics.get("thresholds") or {}).items():
        if thresholds.get("image") is None:
            warnings.append(f"[{category}] no image threshold: decisions are left out")
    return warnings


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
                ("backbones", ", ".join(config.resolved_backbones())),
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
        for path, reason in index.get("skipped_images", []):
            parts.append(f'<div class="warn">unreadable image skipped: {html.escape(path)} ({html.escape(reason)})</div>')
        for note in index.get("notes", []):
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append('<div class="plots">')
        for key in ("roc", "pro", "histogram"):
            if key in index.get("plots", {}):
                source = html.escape(f"{category}/{index['plots'][key]}")
                parts.append(f'<img src="{source}" alt="{html.escape(category)} {key}">')
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


def write_run_report(folder: Path, results: list[Any], config: RunConfig) -> None:
    """``report.html``: results table, warnings, and per category the plots and overlays."""
    folder = Path(folder)
    artifacts.atomic_write_text(folder / "report.html", render_html(folder, config))
