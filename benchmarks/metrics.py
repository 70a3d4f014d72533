#!/usr/bin/env python
"""AU-PRO speed: vad-metrics against a straightforward NumPy port of the official MVTec AD code.

    python benchmarks/metrics.py                 # 100 maps of 256², 20 maps of 1024², 3 timed runs (~1.5-2 min)
    python benchmarks/metrics.py --repeats 5     # more runs for steadier medians
    python benchmarks/metrics.py --quick         # 20 maps of 256², 4 maps of 1024², 1 run (smoke test)

Both sides get the same float32 anomaly maps (Gaussian noise plus a step on the defects, i.e. a
detector of medium quality) and the same masks (one to three discs and a small rectangle per
defective image, one image in three defect-free), and compute AU-PRO up to FPR 0.3.

* **official port**: the algorithm of MVTec AD's ``pro_curve_util.compute_pro`` +
  ``generic_util.trapezoid``, written here independently in plain NumPy: 8-connected
  components per image with one mask per component, one ``argsort`` of every pixel score of
  the category, cumulative FPR / PRO sums, the last point of each distinct score, trapezoid up
  to the limit with interpolation, divided by the limit.
* **vad-metrics**: ``vad_metrics.pro.au_pro`` (partition at the limit's score, one plain sort,
  bincount bookkeeping; exact, see its module docstring).

Each side runs once untimed (first-touch memory), then ``--repeats`` times; the table shows
medians. NumPy's sort and argsort are single-threaded, so 2 cores give both sides one core each
in turn; the script checks that both give the same AU-PRO (to 1e-6: the official code keeps
FPRs in float32, vad-metrics in float64).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from bisect import bisect
from pathlib import Path

import numpy as np
from scipy.ndimage import label

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "metrics"))
from vad_metrics.pro import au_pro  # noqa: E402

# --------------------------------------------------------------------------- the official algorithm, ported


def official_trapezoid(x, y, x_max=None):
    """``generic_util.trapezoid``: area up to x_max, y interpolated at x_max."""
    x = np.array(x)
    y = np.array(y)
    finite = np.logical_and(np.isfinite(x), np.isfinite(y))
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def official_compute_pro(anomaly_maps, ground_truth_maps):
    """``pro_curve_util.compute_pro``: every distinct score is a threshold."""
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels = 0
    num_gt_regions = 0
    shape = (len(anomaly_maps), anomaly_maps[0].shape[0], anomaly_maps[0].shape[1])
    fp_changes = np.zeros(shape, dtype=np.uint32)
    pro_changes = np.zeros(shape, dtype=np.float64)
    for index, gt_map in enumerate(ground_truth_maps):
        labeled, n_components = label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_change = np.zeros_like(gt_map, dtype=fp_changes.dtype)
        fp_change[ok_mask] = 1
        pro_change = np.zeros_like(gt_map, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_change[region_mask] = 1.0 / np.sum(region_mask)
        fp_changes[index] = fp_change
        pro_changes[index] = pro_change
    scores = np.array(anomaly_maps).ravel()
    fp_flat = fp_changes.ravel()
    pro_flat = pro_changes.ravel()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    np.take(scores, order, out=scores)
    np.take(fp_flat, order, out=fp_flat)
    np.take(pro_flat, order, out=pro_flat)
    del order
    np.cumsum(fp_flat, out=fp_flat)
    fprs = fp_flat.astype(np.float32, copy=False)
    np.divide(fprs, num_ok_pixels, out=fprs)
    np.cumsum(pro_flat, out=pro_flat)
    np.divide(pro_flat, num_gt_regions, out=pro_flat)
    pros = pro_flat
    keep = np.append(np.diff(scores) != 0, np.True_)
    fprs, pros = fprs[keep], pros[keep]
    np.clip(fprs, None, 1.0, out=fprs)
    np.clip(pros, None, 1.0, out=pros)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def official_au_pro(anomaly_maps, ground_truth_maps, limit=0.3):
    """``evaluate_experiment.py``: trapezoid up to the limit, divided by it."""
    masks = [np.zeros(m.shape, bool) if g is None else g for m, g in zip(anomaly_maps, ground_truth_maps)]
    fprs, pros = official_compute_pro(anomaly_maps, masks)
    return official_trapezoid(fprs, pros, x_max=limit) / limit


# --------------------------------------------------------------------------- data and timing


def make_data(count: int, size: int, seed: int):
    """Float32 maps and bool masks (None for every third image: defect-free)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps, masks = [], []
    for index in range(count):
        mask = None
        if index % 3:
            mask = np.zeros((size, size), bool)
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(0, size, 2)
                radius = rng.integers(size // 64 + 1, size // 10)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            y0, x0 = rng.integers(0, size - 8, 2)
            mask[y0 : y0 + 3, x0 : x0 + 8] = True
        noise = rng.standard_normal((size, size), dtype=np.float32)
        maps.append(noise if mask is None else noise + np.float32(1.5) * mask)
        masks.append(mask)
    return maps, masks


def timed(function, repeats: int, warmup: int):
    for _ in range(warmup):
        function()
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--limit", type=float, default=0.3, help="FPR integration limit")
    parser.add_argument("--quick", action="store_true", help="small cases, one run: a smoke test")
    args = parser.parse_args()
    cases = [(100, 256), (20, 1024)] if not args.quick else [(20, 256), (4, 1024)]
    repeats, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)

    rows, ok = [], True
    for count, size in cases:
        maps, masks = make_data(count, size, seed=size)
        official_s, official_value = timed(lambda: official_au_pro(maps, masks, args.limit), repeats, warmup)
        ours_s, ours_value = timed(lambda: au_pro(maps, masks, args.limit), repeats, warmup)
        difference = abs(official_value - ours_value)
        ok &= difference <= 1e-6
        rows.append(
            f"| {count} × {size}² | {count * size * size / 1e6:.1f} M | {official_s:.2f} | {ours_s:.2f} | "
            f"{official_s / ours_s:.1f}× | {official_value:.8f} | {ours_value:.8f} | {difference:.1e} |"
        )
        print(f"done: {count} maps of {size}²", file=sys.stderr)

    print(f"AU-PRO (FPR ≤ {args.limit}), median of {repeats} run(s), {os.cpu_count()} cores, NumPy {np.__version__}\n")
    print("| maps | pixels | official port (s) | vad-metrics (s) | speed-up | AU-PRO official | AU-PRO vad | abs. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nresults identical to 1e-6: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
