"""Image and pixel metrics against scikit-learn, hand-made cases, and the Metric classes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vad.contracts import EvaluationData, Region, Sample
from vad.errors import VadError
from vad_metrics import metrics
from vad_metrics.image import accuracy_at, f1_at, image_f1_max
from vad_metrics.pixel import (
    auroc_from_split,
    average_precision_from_split,
    f1_max_from_split,
    iou_at,
    pro_at_threshold_anomalib,
)


@pytest.mark.parametrize("seed", range(5))
def test_sort_based_pixel_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    levels = [5, 50, 10**6][seed % 3]
    negatives = rng.integers(0, levels, 3000) / levels
    positives = rng.integers(0, levels, 200) / levels + 0.1
    scores = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(negatives.size), np.ones(positives.size)])
    assert auroc_from_split(negatives, positives) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision_from_split(negatives, positives) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best, threshold = f1_max_from_split(negatives, positives)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert f1[thresholds == threshold][0] == pytest.approx(best, abs=1e-12)


def test_image_metrics_hand_made():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 0, 1, 1])
    f1, threshold = image_f1_max(scores, labels)
    assert (f1, threshold) == (pytest.approx(0.8), 0.35)
    assert f1_at(scores, labels, 0.5) == pytest.approx(2 / 3)
    assert accuracy_at(scores, labels, 0.5) == pytest.approx(0.75)
    assert accuracy_at(scores, labels, 0.35) == pytest.approx(0.75)  # >= is anomalous


def test_iou_and_anomalib_pro_hand_made():
    anomaly_map = np.array([[0.9, 0.5, 0.2, 0.7], [0.1, 0.1, 0.1, 0.1]])
    mask = np.array([[True, True, False, False], [False, False, False, True]])
    # >= 0.5: predicted {0,0},{0,1},{0,3}; truth {0,0},{0,1},{1,3}: TP 2, union 4
    assert iou_at([anomaly_map], [mask], 0.5) == pytest.approx(0.5)
    # regions: {(0,0),(0,1)} and {(1,3)} (8-connected to nothing); > 0.5 is strict
    assert pro_at_threshold_anomalib([anomaly_map], [mask], 0.5) == pytest.approx((0.5 + 0.0) / 2)


def _data(**overrides):
    rng = np.random.default_rng(0)
    masks = [None, np.zeros((8, 8), bool), np.zeros((8, 8), bool)]
    masks[1][2:4, 2:4] = True
    masks[2][6, 6] = True
    maps = [rng.random((8, 8)) + (0 if m is None else m) for m in masks]
    fields = dict(
        scores=np.array([m.max() for m in maps]),
        labels=np.array([0, 1, 1]),
        maps=maps,
        masks=masks,
        image_threshold=1.0,
        pixel_threshold=0.9,
    )
    fields.update(overrides)
    return EvaluationData(**fields)


ALL = [
    metrics.ImageAUROC, metrics.ImageAP, metrics.ImageF1Max, metrics.ImageF1, metrics.ImageAccuracy,
    metrics.PixelAUROC, metrics.PixelAP, metrics.PixelF1Max, metrics.PixelIoU, metrics.PixelPROAnomalib, metrics.AUPRO,
]


@pytest.mark.parametrize("cls", ALL)
def test_every_metric_computes_a_bounded_number(cls):
    metric = cls()
    data = _data()
    assert metric.applicable(data) is None
    value = metric.compute(data)
    values = value if isinstance(value, dict) else {cls.name: value}
    assert cls.name in values
    assert all(0.0 <= v <= 1.0 for k, v in values.items() if not k.endswith("threshold"))


def test_applicable_gives_reasons():
    assert "no anomaly maps" in metrics.AUPRO().applicable(_data(maps=None))
    assert "no pixel ground truth" in metrics.PixelAUROC().applicable(_data(masks=None))
    assert "both classes" in metrics.AUPRO().applicable(_data(masks=[None, None, None]))
    assert "both classes" in metrics.ImageAUROC().applicable(_data(labels=np.array([1, 1, 1])))
    assert "image threshold" in metrics.ImageF1().applicable(_data(image_threshold=None))
    assert "image threshold" in metrics.ImageAccuracy().applicable(_data(image_threshold=None))
    assert "pixel threshold" in metrics.PixelIoU().applicable(_data(pixel_threshold=None))
    assert "pixel threshold" in metrics.PixelPROAnomalib().applicable(_data(pixel_threshold=None))
    assert "regions" in metrics.AUSPRO().applicable(_data(samples=[Sample(f"{i}.png", 0, "c", "test") for i in range(3)]))


def test_metric_options():
    assert metrics.AUPRO(fpr_limit=0.05).compute(_data()) <= 1.0
    assert metrics.AUPRO().hparams == {"fpr_limit": 0.3}
    with pytest.raises(VadError, match=r"metric 'au_pro' has no option 'limit' \(did you mean 'fpr_limit'\?\); its options are: fpr_limit"):
        metrics.AUPRO(limit=0.3)
    with pytest.raises(VadError, match=r"metric 'au_spro': option fpr_limit=2 is not allowed; fpr_limit must be a number, > 0 and <= 1"):
        metrics.AUSPRO(fpr_limit=2)
    with pytest.raises(VadError, match="metric 'image_auroc' has no option 'foo'; its options are: none"):
        metrics.ImageAUROC(foo=1)


def _loco_data():
    rng = np.random.default_rng(2)

    def region(y, x, saturation):
        mask = np.zeros((10, 10), bool)
        mask[y : y + 3, x : x + 3] = True
        return Region(lambda mask=mask: mask, saturation, "defect")

    samples = [
        Sample("good.png", 0, "c", "test"),
        Sample("s.png", 1, "c", "test", "broken", regions=(region(1, 1, 9.0),), anomaly_kind="structural"),
        Sample("l.png", 1, "c", "test", "missing", regions=(region(5, 5, 3.0), region(0, 6, 2.0)), anomaly_kind="logical"),
    ]
    maps = [rng.random((10, 10)) for _ in samples]
    for sample, anomaly_map in zip(samples, maps):
        for r in sample.regions:
            anomaly_map[r.load_mask()] += 0.5
    masks = [None] + [np.logical_or.reduce([r.load_mask() for r in s.regions]) for s in samples[1:]]
    return EvaluationData(scores=np.array([m.max() for m in maps]), labels=np.array([0, 1, 1]), maps=maps, masks=masks, samples=samples)


def test_au_spro_splits_structural_logical_and_mean():
    from vad_metrics.pro import au_spro

    data = _loco_data()
    metric = metrics.AUSPRO()
    assert metric.applicable(data) is None
    result = metric.compute(data)
    assert set(result) == {"au_spro", "au_spro_structural", "au_spro_logical"}
    regions = [[(r.load_mask(), r.saturation_area) for r in s.regions] for s in data.samples]
    structural = au_spro([data.maps[0], data.maps[1]], [regions[0], regions[1]])
    logical = au_spro([data.maps[0], data.maps[2]], [regions[0], regions[2]])
    assert result["au_spro_structural"] == pytest.approx(structural)
    assert result["au_spro_logical"] == pytest.approx(logical)
    assert result["au_spro"] == pytest.approx((structural + logical) / 2)


def test_registered_through_the_entry_point():
    from vad.plugins import get_registry

    registry = get_registry()
    assert {"au_pro", "au_spro", "image_auroc", "pixel_iou", "pixel_pro_anomalib"} <= set(registry.entries("metrics"))
    assert {"f1-optimal", "max", "quantile", "k-sigma", "manual"} <= set(registry.entries("thresholds"))
    assert registry.load_class("metrics", "au_pro") is metrics.AUPRO


def test_au_spro_without_kinds_and_samples_without_regions():
    data = _loco_data()
    plain_mask = np.zeros((10, 10), bool)
    plain_mask[7:9, 0:2] = True
    data.samples = [data.samples[0], data.samples[1], Sample("m.png", 1, "c", "test", "crack"), Sample("x.png", 1, "c", "test", "crack")]
    data.samples[1].anomaly_kind = None
    data.maps = data.maps[:2] + [data.maps[2], data.maps[2] * 0 + 5.0]
    data.masks = [None, data.masks[1], plain_mask, None]  # the last: anomalous, no ground truth -> left out
    data.labels = np.array([0, 1, 1, 1])
    result = metrics.AUSPRO().compute(data)
    assert set(result) == {"au_spro"}
    from vad_metrics.pro import au_spro

    regions = [[], [(data.samples[1].regions[0].load_mask(), 9.0)], [(plain_mask, 4.0)]]
    assert result["au_spro"] == pytest.approx(au_spro(data.maps[:3], regions))
