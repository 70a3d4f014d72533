"""Image-level metrics on per-image scores (few values: scikit-learn is exact and fast here)."""

from __future__ import annotations

import numpy as np

from vad.errors import VadError
from vad_metrics.pixel import f1_max_from_split


def check_scores(scores, labels, empty: str = "no scores to evaluate") -> tuple[np.ndarray, np.ndarray]:
    """1-D finite float scores and 0/1 labels of the same length, or a VadError (``empty`` says
    what to do when there are none)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.size != labels.size:
        raise VadError(f"got {scores.size} scores but {labels.size} labels")
    if scores.size == 0:
        raise VadError(empty)
    if not np.isfinite(scores).all():
        raise VadError("the scores contain NaN or infinity; the detector produced invalid scores")
    if not np.isin(labels, (0, 1)).all():
        raise VadError(f"labels must be 0 (good) or 1 (anomalous), got values {sorted(set(labels.tolist()))[:5]}")
    return scores, labels.astype(np.int64)


def _need_both(labels: np.ndarray, what: str) -> None:
    if labels.min() == labels.max():
        present = "anomalous" if labels[0] else "good"
        raise VadError(f"{what} needs both good and anomalous images, but all are {present}")


def image_auroc(scores, labels) -> float:
    """Area under the ROC curve of image scores (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    scores, labels = check_scores(scores, labels)
    _need_both(labels, "AUROC")
    return float(roc_auc_score(labels, scores))


def image_roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of image scores from (0, 0) to (1, 1) (scikit-learn's ``roc_curve``): the curve
    whose trapezoidal area :func:`image_auroc` reports."""
    from sklearn.metrics import roc_curve

    scores, labels = check_scores(scores, labels)
    _need_both(labels, "the ROC curve")
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def image_average_precision(scores, labels) -> float:
    """Average precision of image scores (scikit-learn's ``average_precision_score``)."""
    from sklearn.metrics import average_precision_score

    scores, labels = check_scores(scores, labels)
    _need_both(labels, "average precision")
    return float(average_precision_score(labels, scores))


def image_f1_max(scores, labels) -> tuple[float, float]:
    """Best F1 over all thresholds and that threshold (``score >= threshold`` is anomalous)."""
    scores, labels = check_scores(scores, labels)
    _need_both(labels, "F1-max")
    return f1_max_from_split(scores[labels == 0], scores[labels == 1])


def confusion_at(scores, labels, threshold: float) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN) with ``score >= threshold`` predicted anomalous."""
    scores, labels = check_scores(scores, labels)
    predicted = scores >= threshold
    actual = labels == 1
    return (
        int(np.sum(predicted & actual)),
        int(np.sum(predicted & ~actual)),
        int(np.sum(~predicted & ~actual)),
        int(np.sum(~predicted & actual)),
    )


def f1_at(scores, labels, threshold: float) -> float:
    """F1 of the anomalous class at ``threshold`` (0 when nothing is predicted nor present)."""
    tp, fp, _, fn = confusion_at(scores, labels, threshold)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def accuracy_at(scores, labels, threshold: float) -> float:
    """Fraction of images classified correctly at ``threshold``."""
    tp, fp, tn, fn = confusion_at(scores, labels, threshold)
    return (tp + tn) / (tp + fp + tn + fn)
