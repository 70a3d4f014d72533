"""Independent references for the tests: a straightforward NumPy port of the official MVTec AD
AU-PRO code (``pro_curve_util.compute_pro`` + ``generic_util.trapezoid``) and a brute-force
AU-sPRO that evaluates ``score > t`` at every threshold as the official MVTec LOCO code does."""

from __future__ import annotations

from bisect import bisect

import numpy as np
from scipy.ndimage import label


def official_trapezoid(x, y, x_max=None):
    """Port of ``generic_util.trapezoid``."""
    x = np.array(x)
    y = np.array(y)
    finite_mask = np.logical_and(np.isfinite(x), np.isfinite(y))
    x = x[finite_mask]
    y = y[finite_mask]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        mask = x <= x_max
        x = x[mask]
        y = y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def official_pro_curve(anomaly_maps, ground_truth_maps):
    """Port of ``pro_curve_util.compute_pro`` (maps may differ in size: raveled and concatenated)."""
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels = 0
    num_gt_regions = 0
    fp_changes, pro_changes = [], []
    for anomaly_map, gt_map in zip(anomaly_maps, ground_truth_maps):
        if gt_map is None:
            gt_map = np.zeros(anomaly_map.shape, dtype=bool)
        labeled, n_components = label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_change = np.zeros(gt_map.shape, dtype=np.uint32)
        fp_change[ok_mask] = 1
        pro_change = np.zeros(gt_map.shape, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_change[region_mask] = 1.0 / np.sum(region_mask)
        fp_changes.append(fp_change.ravel())
        pro_changes.append(pro_change.ravel())
    scores = np.concatenate([np.asarray(m).ravel() for m in anomaly_maps])
    fp_changes = np.concatenate(fp_changes)
    pro_changes = np.concatenate(pro_changes)
    sort_idxs = np.argsort(scores).astype(np.uint32)[::-1]
    scores = scores[sort_idxs]
    fps = np.cumsum(fp_changes[sort_idxs]).astype(np.float32) / np.float32(num_ok_pixels)
    fprs = fps.astype(np.float32)
    pros = np.cumsum(pro_changes[sort_idxs]) / num_gt_regions
    keep_mask = np.append(np.diff(scores) != 0, np.True_)
    fprs = np.clip(fprs[keep_mask], None, 1.0)
    pros = np.clip(pros[keep_mask], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def official_au_pro(anomaly_maps, ground_truth_maps, limit=0.3):
    """AU-PRO as the official evaluate_experiment.py computes it."""
    fprs, pros = official_pro_curve(anomaly_maps, ground_truth_maps)
    return official_trapezoid(fprs, pros, x_max=limit) / limit


def brute_force_au_spro(anomaly_maps, regions_per_image, limit=0.3):
    """Every distinct score as a threshold, ``score > t`` (official LOCO ``get_binary_images``),
    plus min - 1 (curve end (1, 1)); sPRO per region min(tp / sat, 1); FP outside the union."""
    values = np.unique(np.concatenate([m.ravel() for m in anomaly_maps]))
    thresholds = np.concatenate([[values[-1] + 1.0], values[::-1], [values[0] - 1.0]])
    fp = np.zeros(thresholds.size)
    negatives = 0
    spros = []
    for anomaly_map, regions in zip(anomaly_maps, regions_per_image):
        union = np.zeros(anomaly_map.shape, bool)
        for mask, saturation in regions:
            union |= mask
            saturation = min(saturation, mask.sum())
            tp = np.array([(anomaly_map[mask] > t).sum() for t in thresholds])
            spros.append(np.minimum(tp / saturation, 1.0))
        outside = anomaly_map[~union]
        negatives += outside.size
        fp += np.array([(outside > t).sum() for t in thresholds])
    fprs = fp / negatives
    mean_spro = np.mean(spros, axis=0)
    return official_trapezoid(fprs, mean_spro, x_max=limit) / limit
