"""The report's numerical and drawing parts: curves, overlay choice, strips, TIFF, HTML."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from vad.config import RunConfig
from vad.contracts import Sample
from vad.model import Output
from vad.report import (
    choose_overlays,
    color_range,
    overlay_strip,
    png_bytes,
    pro_curve,
    render_html,
    roc_curve,
    tiff_bytes,
    trapezoid_area,
)


def test_roc_area_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    fpr, tpr, _ = roc_curve(scores, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert trapezoid_area(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_trapezoid_area_interpolates_at_the_limit():
    x, y = np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0])
    assert trapezoid_area(x, y) == pytest.approx(0.75)
    assert trapezoid_area(x, y, limit=0.3) == pytest.approx(0.5 * 0.3 * 0.6)


def test_pro_curve_perfect_map_reaches_full_overlap_at_zero_fpr():
    truth = np.zeros((10, 10), bool)
    truth[2:4, 2:4] = True
    second = np.zeros((10, 10), bool)
    second[7:10, 6:9] = True
    anomaly_map = (truth | second).astype(np.float32)
    fpr, pro = pro_curve([anomaly_map, np.zeros((10, 10), np.float32)], [[truth, second], []])
    # the first step covers both regions fully before any false positive
    assert fpr[1] == 0 and pro[1] == pytest.approx(1.0)
    assert trapezoid_area(fpr, pro, 0.3) / 0.3 == pytest.approx(1.0)


def test_pro_curve_weights_regions_equally():
    small = np.zeros((10, 10), bool)
    small[0, 0] = True
    big = np.zeros((10, 10), bool)
    big[5:10, 5:10] = True
    anomaly_map = np.zeros((10, 10), np.float32)
    anomaly_map[0, 0] = 2.0  # only the small region is found first
    fpr, pro = pro_curve([anomaly_map], [[small, big]])
    assert pro[1] == pytest.approx(0.5)  # one of two regions, whatever their areas


def _output(label: int, score: float) -> Output:
    sample = Sample(path=f"x/{label}-{score}.png", label=label, category="c", split="test", defect_type="d" if label else "good")
    return Output(sample, score, None, None)


def test_choose_overlays_keeps_defective_first_and_the_worst_good_ones():
    outputs = [_output(0, s) for s in (0.1, 0.9, 0.5, 0.2)] + [_output(1, s) for s in (0.7, 0.3)]
    assert choose_overlays(outputs, 0) == [4, 5, 1, 2, 3, 0]
    chosen = choose_overlays(outputs, 4)
    assert chosen[:2] == [4, 5] and chosen[2:] == [1, 2]
    many_defective = [_output(1, float(s)) for s in range(20)] + [_output(0, 5.0)]
    chosen = choose_overlays(many_defective, 8)
    assert len(chosen) == 8 and 20 in chosen  # good images keep a share


def test_color_range_puts_the_threshold_in_the_middle():
    low, high = color_range(1.0, 10.0, 3.0)
    assert (low + high) / 2 == pytest.approx(3.0)
    assert color_range(1.0, 10.0, None) == (1.0, 10.0)
    assert color_range(5.0, 10.0, 3.0) == (5.0, 10.0)  # threshold below every value: span the maps


def test_overlay_strip_has_four_panels_and_encodes_as_png():
    from PIL import Image

    image = np.full((50, 80, 3), 120, np.uint8)
    anomaly_map = np.zeros((50, 80), np.float32)
    anomaly_map[10:20, 10:20] = 5.0
    truth = anomaly_map > 0
    strip = overlay_strip(image, anomaly_map, truth, 2.0, (0.0, 4.0), caption="c", height=64)
    assert strip.dtype == np.uint8 and strip.shape[0] == 64 + 18 + 18
    assert strip.shape[1] == 4 * round(80 * 64 / 50) + 3 * 4
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(strip))))
    assert decoded.shape == strip.shape
    without_truth = overlay_strip(image, anomaly_map, None, None, (0.0, 4.0), show_truth=False, height=64)
    assert without_truth.shape[1] == 3 * round(80 * 64 / 50) + 2 * 4


def test_tiff_keeps_float32_values():
    import tifffile

    anomaly_map = np.random.default_rng(0).random((33, 47)).astype(np.float32)
    back = tifffile.imread(io.BytesIO(tiff_bytes(anomaly_map)))
    assert back.dtype == np.float32 and np.array_equal(back, anomaly_map)


def test_html_lists_warnings_and_escapes_names(tmp_path: Path):
    (tmp_path / "metrics.json").write_text(
        json.dumps({"skipped_metrics": {"c<1>": {"au_spro": "no LOCO regions"}}, "thresholds": {"c<1>": {"image": None}}, "dataset_skipped_files": [["bad.png", "truncated"]]})
    )
    (tmp_path / "results.json").write_text(json.dumps({"columns": ["image_auroc"], "rows": {"c<1>": {"image_auroc": 0.5}, "mean": {"image_auroc": 0.5}}}))
    page = render_html(tmp_path, RunConfig(pretrained=False, backbones=["b"]))
    assert "RANDOMLY INITIALISED" in page and "au_spro skipped: no LOCO regions" in page
    assert "bad.png" in page and "no image threshold" in page
    assert "c&lt;1&gt;" in page and "c<1>" not in page
