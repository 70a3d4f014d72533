"""AU-PRO (MVTec AD) and AU-sPRO (MVTec LOCO AD): exact, and fast.

Definitions (Bergmann's thesis, Eq. 2.11 and 6.1; the official MVTec evaluation code):

* **Regions.** AU-PRO: the 8-connected components of each ground-truth mask
  (``scipy.ndimage.label(mask, np.ones((3, 3)))``, as the official ``pro_curve_util.py``; the
  thesis text says 4-connectivity, the published numbers use 8). AU-sPRO: one region per
  annotation (:class:`vad.contracts.Region`), never split into components (official LOCO code).
* **Thresholds.** Every distinct anomaly score ``t`` is a threshold; a pixel is predicted
  anomalous when its score is ``>= t`` (the official AU-PRO code sorts all scores and keeps, for
  each distinct score, the last point of that score: the same set of points; the LOCO code uses
  ``score > t`` on a refined threshold grid, whose limit is again this set of points).
* **FPR** = false-positive pixels / all ground-truth-negative pixels, pooled over all images
  (good images included). For sPRO a pixel is negative only outside the union of all
  annotations of its image.
* **PRO** = the overlap ``|region ∩ predicted| / |region|`` averaged over all regions of all
  images; **sPRO** uses ``min(|region ∩ predicted| / saturation_area, 1)``.
* **Area**: the curve starts at (0, 0) and ends at (1, 1); it is integrated with the
  trapezoid rule up to ``fpr_limit``, interpolating linearly at the limit, and divided by
  ``fpr_limit`` (``generic_util.trapezoid`` of the official code).

Why it is fast, and still exact. The official code (see ``benchmarks/metrics.py`` for a
straightforward port) argsorts every pixel score of the category. Here:

1. only points up to the first one past ``fpr_limit`` enter the area, so only pixels whose
   score is at least the score ``t_lo`` where the FPR first exceeds the limit are needed;
   ``t_lo`` is found with one ``np.partition`` of the negative scores (linear time);
2. no ``argsort``: one plain ``np.sort`` (SIMD, far faster than ``argsort``; ``benchmarks/metrics.py``)
   of the kept scores gives the distinct thresholds and how many scores lie at or above each;
   the positive entries are placed among the distinct values by binary search and their counts
   and weights accumulated with ``np.bincount`` + ``np.cumsum`` from the top;
3. region areas come from one ``np.bincount`` per image instead of one mask per region.

The per-pixel weights (``1 / area`` for PRO, the rank increments of ``min(k / s, 1)`` for sPRO)
are summed in descending score order and the value at each distinct score is the sum over all
pixels with score ``>= t``: identical to the official cumulative sums up to float rounding.
Deviation: FPRs are float64 here (the official code stores them as float32, an error of at most
~6e-8 relative).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vad.contracts import Metric
from vad.errors import VadError
from vad.options import option

#: 8-connectivity, as the official MVTec AD / 3D-AD evaluation code.
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# --------------------------------------------------------------------------- integration


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under the polyline ``(x, y)`` up to ``x_max``, as the official ``generic_util.trapezoid``.

    ``x`` ascends (repeated values allowed). Non-finite points are dropped. When ``x_max`` is not
    one of the ``x``, ``y`` is interpolated linearly between its neighbours and the partial
    trapezoid up to ``x_max`` is added; points beyond ``x_max`` are ignored.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            insert_at = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect_right
            if not 0 < insert_at < x.size:
                raise VadError(f"integration limit {x_max} lies outside the curve's x range [{x[0]}, {x[-1]}]")
            x0, x1, y0, y1 = x[insert_at - 1], x[insert_at], y[insert_at - 1], y[insert_at]
            y_at_limit = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_at_limit + y0) * (x_max - x0)
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def points_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The points of an ascending curve that its area up to ``x_max`` uses: every point with
    ``x <= x_max`` and the first one beyond (:func:`trapezoid` gives the same area on them)."""
    end = int(np.searchsorted(x, x_max, side="right")) + 1
    return x[:end], y[:end]


class FprLimitOptions(Metric.Options):
    """The integration limit of the area metrics (declared once: the metrics' option and the
    functions' argument check)."""

    fpr_limit: float = option(0.3, "Integrate the curve up to this false positive rate, then normalise (official 0.3).", gt=0, le=1)


def check_fpr_limit(fpr_limit: float, owner: str) -> float:
    """``fpr_limit`` as a float in (0, 1], checked by its declaration, or a VadError naming ``owner``."""
    return FprLimitOptions.parse({"fpr_limit": fpr_limit}, owner=owner).fpr_limit


# --------------------------------------------------------------------------- the curve


def overlap_curve(
    negative_scores: np.ndarray,
    positive_scores: np.ndarray,
    positive_weights: np.ndarray,
    num_regions: int,
    fpr_limit: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, mean overlap) curve at every distinct score, from (0, 0) to (1, 1).

    ``negative_scores``: scores of every ground-truth-negative pixel. ``positive_scores`` /
    ``positive_weights``: one entry per (pixel, region) pair with the amount by which the summed
    overlap of all regions grows when that pixel turns positive (``1 / area`` for PRO). The mean
    overlap is the weight sum over entries with score ``>= t`` divided by ``num_regions``.

    With ``fpr_limit`` the curve holds every point with FPR ``<= fpr_limit`` and at least the
    first point beyond it (all the area up to the limit needs), then (1, 1).
    """
    negative_scores = np.asarray(negative_scores).ravel()
    positive_scores = np.asarray(positive_scores).ravel()
    positive_weights = np.asarray(positive_weights, dtype=np.float64).ravel()
    num_negative = negative_scores.size
    if num_negative == 0:
        raise VadError("the FPR needs ground-truth-negative pixels, but every pixel is marked anomalous")
    if num_regions <= 0:
        raise VadError("the overlap needs at least one ground-truth region, but no mask marks a pixel")

    negative_kept = negative_scores
    if fpr_limit is not None and fpr_limit < 1.0:
        # Keep the `needed` largest negative scores: their count exceeds fpr_limit * N by at least
        # 2, so the smallest kept score t_lo has FPR(t_lo) > fpr_limit and every point the area
        # needs (FPR <= limit, plus the first beyond) has a threshold >= t_lo.
        needed = math.ceil(fpr_limit * num_negative) + 2
        if needed < num_negative:
            split = num_negative - needed
            partitioned = np.partition(negative_scores, split)
            t_lo = partitioned[split]
            # Scores equal to t_lo left below the split still count at threshold t_lo.
            ties_below = int(np.count_nonzero(partitioned[:split] == t_lo))
            negative_kept = partitioned[split:]
            if ties_below:
                negative_kept = np.concatenate([negative_kept, np.full(ties_below, t_lo, negative_kept.dtype)])
            kept = positive_scores >= t_lo
            positive_scores, positive_weights = positive_scores[kept], positive_weights[kept]

    # One sort of every kept score; the first occurrence of each distinct value tells how many
    # scores are >= it. Positive entries are located among the distinct values (a binary search
    # per positive, not per threshold) and their counts and weights accumulated from the top.
    dtype = np.result_type(negative_kept, positive_scores)
    everything = np.concatenate([negative_kept.astype(dtype, copy=False), positive_scores.astype(dtype, copy=False)])
    everything.sort()
    first = np.empty(everything.size, dtype=bool)
    first[0] = True
    np.not_equal(everything[1:], everything[:-1], out=first[1:])
    first_index = np.flatnonzero(first)
    distinct = everything[first_index]  # ascending
    at_or_above = everything.size - first_index
    slot = np.searchsorted(distinct, positive_scores.astype(dtype, copy=False))
    positives = np.cumsum(np.bincount(slot, minlength=distinct.size)[::-1])  # descending thresholds
    overlap = np.cumsum(np.bincount(slot, weights=positive_weights, minlength=distinct.size)[::-1])
    false_positives = at_or_above[::-1] - positives

    fprs = false_positives / num_negative
    pros = overlap / num_regions
    # like the official code: no value above 1 from rounding, then the end points
    np.minimum(fprs, 1.0, out=fprs)
    np.minimum(pros, 1.0, out=pros)
    return np.concatenate([[0.0], fprs, [1.0]]), np.concatenate([[0.0], pros, [1.0]])


def area_under_curve(fprs: np.ndarray, overlaps: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under an (FPR, overlap) curve up to ``fpr_limit`` (divided by the limit)."""
    return trapezoid(fprs, overlaps, x_max=fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- inputs


def check_map(anomaly_map: np.ndarray, index: int) -> np.ndarray:
    """A 2-D real-valued anomaly map (``[1, H, W]`` is squeezed) without NaN, or a VadError."""
    array = np.asarray(anomaly_map)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise VadError(f"anomaly map {index} must be 2-D [H, W], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise VadError(f"anomaly map {index} must hold real numbers, got dtype {array.dtype}")
    if array.dtype == np.float16 or not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32 if array.dtype.itemsize <= 2 else np.float64)
    if np.isnan(array).any():
        raise VadError(f"anomaly map {index} contains NaN; the detector produced invalid scores")
    return array


def check_mask(mask: np.ndarray | None, shape: tuple[int, ...], index: int) -> np.ndarray | None:
    """A bool mask of ``shape`` (``[1, H, W]`` squeezed, non-zero = anomalous), None kept."""
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.shape != tuple(shape):
        raise VadError(
            f"ground-truth mask {index} has shape {array.shape} but its anomaly map has {tuple(shape)}; "
            "pixel metrics compare them at each image's original resolution"
        )
    return array.astype(bool, copy=False)


def _pairs(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]):
    if len(anomaly_maps) != len(masks):
        raise VadError(f"got {len(anomaly_maps)} anomaly maps but {len(masks)} ground-truth masks")
    if len(anomaly_maps) == 0:
        raise VadError("no anomaly maps to evaluate")
    for index, (anomaly_map, mask) in enumerate(zip(anomaly_maps, masks)):
        anomaly_map = check_map(anomaly_map, index)
        yield anomaly_map, check_mask(mask, anomaly_map.shape, index)


def within(roi: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """The region of interest as a bool mask of ``shape`` (None: every pixel counts)."""
    if roi is None:
        return None
    inside = np.asarray(roi, bool)
    if inside.shape != tuple(shape):
        raise VadError(f"the region of interest is {inside.shape} but an anomaly map is {tuple(shape)}")
    return inside


def restricted(mask: np.ndarray | None, inside: np.ndarray | None) -> np.ndarray | None:
    """The ground truth inside the region of interest (pixels outside it are ignored)."""
    return mask if mask is None or inside is None else mask & inside


def region_contributions(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], roi: np.ndarray | None = None):
    """Negative scores, positive scores with weights ``1 / area``, and the number of regions.

    Regions are the 8-connected components of each mask; ``None`` masks are all negative. With a
    region of interest ``roi`` (bool, the maps' size) only pixels inside it count: regions are
    the components of the ground truth inside it, negatives the normal pixels inside it.
    """
    from scipy import ndimage

    negatives, positives, weights = [], [], []
    num_regions = 0
    for anomaly_map, mask in _pairs(anomaly_maps, masks):
        counted = within(roi, anomaly_map.shape)
        mask = restricted(mask, counted)
        if mask is None or not mask.any():
            negatives.append(anomaly_map.ravel() if counted is None else anomaly_map[counted])
            continue
        labeled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        labeled = labeled.ravel()
        flat = anomaly_map.ravel()
        inside = labeled > 0
        areas = np.bincount(labeled, minlength=count + 1)
        negatives.append(flat[~inside] if counted is None else flat[~inside & counted.ravel()])
        positives.append(flat[inside])
        weights.append(1.0 / areas[labeled[inside]])
        num_regions += count
    return _concat(negatives), _concat(positives), _concat(weights, np.float64), num_regions


def _concat(parts: list[np.ndarray], dtype=None) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype or np.float64)
    return np.concatenate(parts) if dtype is None else np.concatenate(parts).astype(dtype, copy=False)


# --------------------------------------------------------------------------- AU-PRO


def pro_curve(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], fpr_limit: float | None = None, roi: np.ndarray | None = None):
    """(fprs, pros) of the PRO curve; with ``fpr_limit`` only the part the area needs; with
    ``roi`` only the pixels inside it (:func:`region_contributions`)."""
    negatives, positives, weights, num_regions = region_contributions(anomaly_maps, masks, roi)
    return overlap_curve(negatives, positives, weights, num_regions, fpr_limit)


def au_pro(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], fpr_limit: float = 0.3, roi: np.ndarray | None = None) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AU-PRO).

    ``anomaly_maps`` are real ``[H, W]`` arrays (any size per image); ``masks`` bool arrays of the
    same shapes or None for images without defects; ``roi``: only the pixels inside it count.
    Raises VadError without negative pixels or without any anomalous pixel.
    """
    fpr_limit = check_fpr_limit(fpr_limit, "au_pro")
    fprs, pros = pro_curve(anomaly_maps, masks, fpr_limit, roi)
    return area_under_curve(fprs, pros, fpr_limit)


# --------------------------------------------------------------------------- AU-sPRO


def saturated_weights(region_scores: np.ndarray, saturation_area: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores of one region in descending order and the sPRO increment of each.

    The k-th highest-scoring pixel raises the region's overlap from ``min((k-1)/s, 1)`` to
    ``min(k/s, 1)``. Pixels with equal scores always turn positive together, so the order among
    them does not change any point of the curve.
    """
    scores = np.sort(region_scores)[::-1]
    ranks = np.arange(scores.size + 1, dtype=np.float64)
    level = np.minimum(ranks / saturation_area, 1.0)
    return scores, np.diff(level)


def spro_contributions(anomaly_maps, regions_per_image):
    """Negative scores, (pixel, region) entries with sPRO increments, and the region count.

    ``regions_per_image``: for each map, a list of ``(bool mask, saturation_area)``; an empty
    list marks a good image. Negative pixels are those outside the union of the image's masks.
    """
    if len(anomaly_maps) != len(regions_per_image):
        raise VadError(f"got {len(anomaly_maps)} anomaly maps but region lists for {len(regions_per_image)} images")
    negatives, positives, weights = [], [], []
    num_regions = 0
    for index, (anomaly_map, regions) in enumerate(zip(anomaly_maps, regions_per_image)):
        anomaly_map = check_map(anomaly_map, index)
        if not regions:
            negatives.append(anomaly_map.ravel())
            continue
        union = np.zeros(anomaly_map.shape, dtype=bool)
        for number, (mask, saturation_area) in enumerate(regions):
            mask = check_mask(mask, anomaly_map.shape, index)
            area = int(mask.sum())
            if area == 0:
                raise VadError(f"region {number} of image {index} has an empty mask; every annotation must mark pixels")
            if not saturation_area > 0:
                raise VadError(
                    f"region {number} of image {index} has saturation area {saturation_area}; it must be a positive "
                    "number of pixels at the image's original resolution"
                )
            # the official code uses min(threshold, area) for absolute thresholds (relative ones
            # are int(fraction * area) <= area already)
            scores, increments = saturated_weights(anomaly_map[mask], min(float(saturation_area), float(area)))
            positives.append(scores)
            weights.append(increments)
            union |= mask
            num_regions += 1
        negatives.append(anomaly_map[~union])
    return _concat(negatives), _concat(positives), _concat(weights, np.float64), num_regions


def au_spro(anomaly_maps, regions_per_image, fpr_limit: float = 0.3) -> float:
    """Normalised area under the sPRO curve up to ``fpr_limit`` (MVTec LOCO's AU-sPRO).

    See :func:`spro_contributions` for ``regions_per_image``. The structural / logical split is
    made by the caller: evaluate each kind's anomalous images together with all good images.
    """
    fpr_limit = check_fpr_limit(fpr_limit, "au_spro")
    negatives, positives, weights, num_regions = spro_contributions(anomaly_maps, regions_per_image)
    fprs, spros = overlap_curve(negatives, positives, weights, num_regions, fpr_limit)
    return area_under_curve(fprs, spros, fpr_limit)
