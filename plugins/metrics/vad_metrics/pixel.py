"""Pixel-level metrics over all pixels of a category, at each image's original resolution.

A category easily holds 10^7-10^8 pixels; scikit-learn's curves argsort them (seconds to
minutes). The same numbers come from sorting: ROC AUC is the Mann-Whitney statistic (ties count
1/2, exactly the trapezoidal ROC area scikit-learn reports), AP and F1-max only need the number
of negatives at or above each distinct positive score. The tests check each against
scikit-learn on random data with ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vad.errors import VadError
from vad_metrics.pro import EIGHT_CONNECTED, _pairs, restricted, within


def split_pixels(anomaly_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], roi: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of all ground-truth-negative and of all positive pixels (``None`` masks: all
    negative); with a region of interest ``roi`` (bool, the maps' size), of the pixels inside it."""
    negatives, positives = [], []
    for anomaly_map, mask in _pairs(anomaly_maps, masks):
        inside = within(roi, anomaly_map.shape)
        if mask is None:
            negatives.append(anomaly_map.ravel() if inside is None else anomaly_map[inside])
        else:
            normal = ~mask if inside is None else ~mask & inside
            negatives.append(anomaly_map[normal])
            positives.append(anomaly_map[restricted(mask, inside)])
    negatives = np.concatenate(negatives)
    positives = np.concatenate(positives) if positives else np.zeros(0, dtype=negatives.dtype)
    return negatives, positives


def _need_both(negatives: np.ndarray, positives: np.ndarray, what: str) -> None:
    if negatives.size == 0 or positives.size == 0:
        missing = "anomalous" if positives.size == 0 else "normal"
        raise VadError(f"{what} needs both normal and anomalous samples, but there is no {missing} one")


def auroc_from_split(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: P(positive > negative) + P(equal) / 2, exact."""
    negatives, positives = np.asarray(negatives).ravel(), np.asarray(positives).ravel()
    _need_both(negatives, positives, "AUROC")
    negatives = np.sort(negatives)
    positives = np.sort(positives)
    below = np.searchsorted(negatives, positives, side="left")
    at_or_below = np.searchsorted(negatives, positives, side="right")
    # integer sums are exact; one division at the end
    twice = 2 * int(below.sum(dtype=np.int64)) + int((at_or_below - below).sum(dtype=np.int64))
    return twice / (2 * negatives.size * positives.size)


def _counts_at_positive_thresholds(negatives: np.ndarray, positives: np.ndarray):
    """Distinct positive scores (descending) and TP, FP counts for ``score >= t`` at each."""
    negatives = np.sort(np.asarray(negatives).ravel())
    positives = np.sort(np.asarray(positives).ravel())
    first = np.ones(positives.size, dtype=bool)
    first[1:] = positives[1:] != positives[:-1]
    index = np.flatnonzero(first)
    thresholds = positives[index][::-1]
    true_positives = (positives.size - index)[::-1]
    false_positives = negatives.size - np.searchsorted(negatives, thresholds, side="left")
    return thresholds, true_positives, false_positives


def average_precision_from_split(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over descending thresholds (scikit-learn's)."""
    _need_both(np.asarray(negatives).ravel(), np.asarray(positives).ravel(), "average precision")
    _, tp, fp = _counts_at_positive_thresholds(negatives, positives)
    precision = tp / (tp + fp)
    recall_steps = np.diff(np.concatenate([[0], tp])) / tp[-1]
    return float(np.sum(recall_steps * precision))


def f1_max_from_split(negatives: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold giving it (``score >= threshold``).

    Adding only negatives never raises F1, so the distinct positive scores are the candidates.
    Ties between thresholds keep the highest threshold.
    """
    _need_both(np.asarray(negatives).ravel(), np.asarray(positives).ravel(), "F1-max")
    thresholds, tp, fp = _counts_at_positive_thresholds(negatives, positives)
    f1 = 2 * tp / (tp + fp + tp[-1])
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def iou_at(anomaly_maps, masks, threshold: float, roi: np.ndarray | None = None) -> float:
    """Intersection over union of ``score >= threshold`` and the ground truth over all pixels
    (inside ``roi`` when given)."""
    negatives, positives = split_pixels(anomaly_maps, masks, roi)
    true_positives = int(np.count_nonzero(positives >= threshold))
    false_positives = int(np.count_nonzero(negatives >= threshold))
    union = positives.size + false_positives
    if union == 0:
        raise VadError("IoU is undefined: no pixel is anomalous in the ground truth nor predicted")
    return true_positives / union


def pro_at_threshold_anomalib(anomaly_maps, masks, threshold: float, roi: np.ndarray | None = None) -> float:
    """Per-region overlap at one threshold, as anomalib 1.x's ``PRO`` metric computes it.

    anomalib binarises min-max-normalised maps at 0.5, which is ``raw score > pixel threshold``
    (strict, as there), labels 8-connected ground-truth components and averages the recall of
    every component over all images (macro average). Not the AU-PRO of the papers.
    """
    from scipy import ndimage

    total, count = 0.0, 0
    for anomaly_map, mask in _pairs(anomaly_maps, masks):
        mask = restricted(mask, within(roi, anomaly_map.shape))
        if mask is None or not mask.any():
            continue
        labeled, regions = ndimage.label(mask, structure=EIGHT_CONNECTED)
        labeled = labeled.ravel()
        detected = anomaly_map.ravel() > threshold
        areas = np.bincount(labeled, minlength=regions + 1)[1:]
        hits = np.bincount(labeled[detected], minlength=regions + 1)[1:]
        total += float(np.sum(hits / areas))
        count += regions
    if count == 0:
        raise VadError("PRO needs ground-truth regions, but no mask marks a pixel")
    return total / count
