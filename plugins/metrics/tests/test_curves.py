"""The curves the metrics offer the report: the points each metric integrates, so that the area
of the drawn curve is the metric's value."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from vad.contracts import EvaluationData
from vad_metrics import metrics
from vad_metrics.pro import points_up_to, trapezoid


def image_data(seed: int = 0) -> EvaluationData:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    return EvaluationData(scores=scores, labels=labels)


def pixel_data(seed: int = 0) -> EvaluationData:
    """Noisy maps scoring two rectangles per defective image higher; good images have no mask."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(9):
        mask = None
        if index % 3:
            mask = np.zeros((48, 48), bool)
            top, left = rng.integers(0, 40, 2)
            mask[top : top + 6, left : left + 8] = True
            mask[rng.integers(0, 48), rng.integers(0, 48)] = True
        maps.append(np.round(rng.normal(0, 1, (48, 48)) + (0 if mask is None else 1.5 * mask), 1))  # ties
        masks.append(mask)
    return EvaluationData(scores=np.array([m.max() for m in maps]), labels=np.array([int(m is not None) for m in masks]), maps=maps, masks=masks)


@pytest.mark.parametrize("seed", range(3))
def test_image_roc_curve_is_scikit_learns_and_its_area_the_auroc(seed):
    data = image_data(seed)
    metric = metrics.ImageAUROC()
    (curve,) = metric.curves(data)
    fpr, tpr, _ = roc_curve(data.labels, data.scores)
    assert curve.name == "roc" and curve.x_limit is None
    assert np.array_equal(curve.x, fpr) and np.array_equal(curve.y, tpr)
    assert curve.x[0] == curve.y[0] == 0 and curve.x[-1] == curve.y[-1] == 1
    assert trapezoid(curve.x, curve.y) == pytest.approx(metric.compute(data), abs=1e-12)
    assert curve.label == f"AUROC {metric.compute(data):.4f}"


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_pro_curve_stops_past_the_limit_and_its_area_is_the_au_pro(fpr_limit):
    data = pixel_data()
    metric = metrics.AUPRO(fpr_limit=fpr_limit)
    (curve,) = metric.curves(data)
    assert curve.name == "pro" and curve.x_limit == fpr_limit
    assert curve.x[0] == curve.y[0] == 0 and np.all(np.diff(curve.x) >= 0)
    # every point up to the limit and the first one beyond: all the area needs, nothing more
    assert curve.x[-2] <= fpr_limit and (curve.x[-1] > fpr_limit or curve.x[-1] == 1.0)
    value = metric.compute(data)
    assert trapezoid(curve.x, curve.y, x_max=fpr_limit) / fpr_limit == pytest.approx(value, abs=1e-12)
    assert curve.label == f"AU-PRO({fpr_limit:g}) {value:.4f}"


def test_points_up_to_keeps_the_first_point_past_the_limit():
    x, y = np.array([0.0, 0.1, 0.2, 0.3, 0.6, 1.0]), np.arange(6.0)
    assert points_up_to(x, y, 0.25)[0].tolist() == [0.0, 0.1, 0.2, 0.3]
    assert points_up_to(x, y, 0.3)[0].tolist() == [0.0, 0.1, 0.2, 0.3, 0.6]
    assert points_up_to(x, y, 1.0)[0].tolist() == x.tolist()
    kept_x, kept_y = points_up_to(x, y, 0.25)
    assert trapezoid(kept_x, kept_y, x_max=0.25) == pytest.approx(trapezoid(x, y, x_max=0.25))


def test_other_metrics_offer_no_curves():
    assert metrics.ImageAP().curves(image_data()) == []
