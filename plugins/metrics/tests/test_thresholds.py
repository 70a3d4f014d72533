"""Threshold rules and score normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from vad.errors import VadError
from vad_metrics.thresholds import (
    F1OptimalThreshold,
    KSigmaThreshold,
    ManualThreshold,
    MaxThreshold,
    QuantileThreshold,
    normalize_scores,
)

SCORES = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 5.0, 6.0])
LABELS = np.array([0, 0, 0, 0, 0, 1, 1])  # the 10.0 is a normal outlier


def test_max_flags_no_normal_validation_score():
    threshold = MaxThreshold().fit(SCORES, LABELS)
    assert threshold > 10.0 and threshold == np.nextafter(10.0, np.inf)
    assert not (SCORES[LABELS == 0] >= threshold).any()


def test_quantile_of_normal_scores_only():
    assert QuantileThreshold(q=0.5).fit(SCORES, LABELS) == pytest.approx(3.0)
    assert QuantileThreshold().fit(SCORES, LABELS) == pytest.approx(np.quantile([1, 2, 3, 4, 10], 0.99))
    assert QuantileThreshold(q=0.75).hparams == {"q": 0.75}


def test_k_sigma_of_normal_scores_only():
    normal = np.array([1, 2, 3, 4, 10.0])
    assert KSigmaThreshold().fit(SCORES, LABELS) == pytest.approx(normal.mean() + 3 * normal.std())
    assert KSigmaThreshold(k=1).fit(SCORES, LABELS) == pytest.approx(normal.mean() + normal.std())


def test_k_sigma_needs_a_spread_and_never_flags_the_normals_it_was_fitted_on(capsys):
    with pytest.raises(VadError, match="at least 2 normal calibration scores .*got 1"):
        KSigmaThreshold().fit(np.array([3.0]), np.array([0]))
    assert KSigmaThreshold.min_scores == 2  # checked before fitting (vad.model.AnomalyModel.check_calibration)
    same = np.array([2.0, 2.0, 2.0])
    assert KSigmaThreshold().fit(same, np.zeros(3, int)) > 2.0  # no spread: just above them
    assert "fitted on 3 normal scores" in " ".join(capsys.readouterr().err.split())  # and a warning: few scores


def test_f1_optimal_on_labelled_data():
    threshold = F1OptimalThreshold().fit(SCORES, LABELS)
    assert threshold == 5.0  # flags 5, 6 and the outlier 10: F1 = 0.8
    assert F1OptimalThreshold.needs_anomalous


def test_f1_optimal_without_anomalous_samples_names_the_normal_only_rules():
    with pytest.raises(VadError, match="needs anomalous validation samples.*max, quantile, k-sigma.*manual"):
        F1OptimalThreshold().fit(SCORES[:5], LABELS[:5])


def test_manual():
    assert ManualThreshold(value=0.25).fit(SCORES, LABELS) == 0.25
    assert ManualThreshold(value="0.5").hparams == {"value": 0.5}
    with pytest.raises(VadError, match=r"threshold 'manual' needs option 'value'.*--set manual.value="):
        ManualThreshold()


def test_bad_options_and_inputs():
    with pytest.raises(VadError, match=r"threshold 'quantile': option q=1.5 is not allowed; q must be a number, >= 0 and <= 1"):
        QuantileThreshold(q=1.5)
    with pytest.raises(VadError, match="option k='three' is not allowed; k must be a number"):
        KSigmaThreshold(k="three")
    with pytest.raises(VadError, match="threshold 'quantile' has no option 'p'; its options are: q"):
        QuantileThreshold(p=0.9)
    with pytest.raises(VadError, match="threshold 'max' has no option 'value'; its options are: none"):
        MaxThreshold(value=3)
    with pytest.raises(VadError, match="every validation sample is anomalous"):
        MaxThreshold().fit(SCORES[5:], LABELS[5:])
    with pytest.raises(VadError, match="no validation scores"):
        KSigmaThreshold().fit(np.array([]), np.array([]))
    with pytest.raises(VadError, match="NaN"):
        QuantileThreshold().fit(np.array([1.0, np.nan]), np.array([0, 0]))
    with pytest.raises(VadError, match="2 scores but 1 labels"):
        MaxThreshold().fit(np.array([1.0, 2.0]), np.array([0]))


def test_normalize_scores_maps_the_threshold_to_one_half():
    scores = np.array([0.0, 2.0, 5.0, 10.0])
    normalized = normalize_scores(scores, threshold=5.0, min_value=0.0, max_value=10.0)
    assert normalized.tolist() == pytest.approx([0.0, 0.2, 0.5, 1.0])
    assert np.all(np.diff(normalized) >= 0)
    assert normalize_scores(np.array([20.0]), 5.0, 0.0, 10.0, clip=False)[0] == pytest.approx(2.0)
    with pytest.raises(VadError, match="max_value > min_value"):
        normalize_scores(scores, 5.0, 3.0, 3.0)
