"""Where the normal scores behind the thresholds come from, and what false-alarm rate they imply.

Thresholds (and score-level ensembles) need scores of normal images the detector has not
seen. vad gets them without taking training images away from the detector where it can:

* ``leave-one-out``: the detector is fitted on every training image, then scores each training
  image as if that image had been left out of fit (:attr:`vad.contracts.Detector.leave_one_out`:
  a memory bank without the image's own patches, a Gaussian downdated by the image);
* ``cross-fit``: ``folds`` copies of the model, each fitted on the other folds, score the
  held-out fold; the final model is fitted on every image. Costs ``folds`` extra fits;
* ``hold-out``: a share of the training images (the data set's validation split when it has
  one, else ``holdout_fraction``) is kept from the detector and scored. Costs those images;
* ``auto`` (the default): the data set's validation split when it has one, else
  leave-one-out when every member offers it (and no member reads features a network learned
  from the training images: ``FeatureSource.leave_one_out``), else cross-fit when every member fits in one pass
  over its inputs and is ``cheap_to_refit``, else hold-out (trained detectors: cross-fitting
  would train their networks again ``folds`` times, even with one epoch).

:func:`false_alarm_estimate` turns the calibration scores and a threshold into the false-alarm
rate to expect on new normal images, with an interval: for exchangeable normal scores, a
threshold above ``k`` of ``n`` calibration scores flags a new normal image with probability
``Beta(n + 1 - k, k)``-distributed over the draw of the calibration set (the conformal argument;
its mean is ``(n + 1 - k) / (n + 1)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

from vad.errors import VadError

T = TypeVar("T")

METHODS = ("auto", "leave-one-out", "cross-fit", "hold-out")
#: Coverage of the false-alarm interval shown with every threshold.
CONFIDENCE = 0.95


def false_alarm_estimate(normal_scores: Sequence[float], threshold: float, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The false-alarm rate a threshold implies on new normal images: expected value and a
    central ``confidence`` interval, from the ``n`` calibration scores (``score >= threshold``
    is a false alarm)."""
    from scipy.stats import beta

    n = len(normal_scores)
    below = sum(1 for score in normal_scores if score < threshold)
    if n == 0:
        return {"scores": 0, "expected": None, "low": None, "high": None, "confidence": confidence}
    if below == 0:  # the threshold flags every calibration score
        return {"scores": n, "expected": 1.0, "low": 1.0, "high": 1.0, "confidence": confidence}
    a, b = n + 1 - below, below
    tail = (1 - confidence) / 2
    return {
        "scores": n,
        "expected": a / (n + 1),
        "low": float(beta.ppf(tail, a, b)),
        "high": float(beta.ppf(1 - tail, a, b)),
        "confidence": confidence,
    }


def false_alarms_on(normals: int, estimate: dict[str, Any]) -> dict[str, Any] | None:
    """The range the observed false-alarm rate on ``normals`` new normal images should fall in
    (central interval of the beta-binomial predictive distribution of :func:`false_alarm_estimate`)."""
    from scipy.stats import betabinom

    n, expected = estimate.get("scores") or 0, estimate.get("expected")
    if normals < 1 or expected is None:
        return None
    if expected >= 1.0:
        return {"normals": normals, "low": 1.0, "high": 1.0, "confidence": estimate["confidence"]}
    a = round(expected * (n + 1))
    tail = (1 - estimate["confidence"]) / 2
    distribution = betabinom(normals, a, n + 1 - a)
    return {
        "normals": normals,
        "low": float(distribution.ppf(tail)) / normals,
        "high": float(distribution.ppf(1 - tail)) / normals,
        "confidence": estimate["confidence"],
    }


def false_alarm_warning(calibration: dict[str, Any]) -> str | None:
    """A warning when the good test images are flagged outside the range calibration predicts:
    they are then not like the training images (or the calibration set was too small to tell)."""
    on_test, observed = calibration.get("test_false_alarm_range"), calibration.get("test_false_alarm_observed")
    if not on_test or observed is None or on_test["low"] <= observed <= on_test["high"]:
        return None
    direction = "more" if observed > on_test["high"] else "less"
    return (
        f"the good test images were flagged {direction} often ({_percent(observed)}) than the calibration predicts "
        f"({_percent(on_test['low'])} to {_percent(on_test['high'])}): they differ from the training images, "
        "so the stated false-alarm rate does not hold for them"
    )


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def smallest_certifiable_alpha(n: int) -> float:
    """The smallest false-alarm rate a conformal threshold can guarantee with ``n`` scores."""
    return 1.0 / (n + 1)


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``: the rank (1-based) of the calibration score a conformal
    threshold with false-alarm rate ``alpha`` must exceed; above ``n`` the guarantee needs
    more scores."""
    return math.ceil((n + 1) * (1 - alpha) - 1e-12)


def split_hold_out(samples: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """``(kept for fit, held out)``: a seeded share ``fraction`` of ``samples`` held out (at
    least one each way)."""
    import numpy as np

    count = len(samples)
    held = min(count - 1, max(1, round(count * fraction)))
    if count < 2:
        raise VadError(f"hold-out calibration needs at least 2 training images, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    held_out = set(order[:held].tolist())
    return [s for i, s in enumerate(samples) if i not in held_out], [s for i, s in enumerate(samples) if i in held_out]


def fold_of(count: int, folds: int, seed: int) -> list[int]:
    """A seeded fold number in ``range(folds)`` for each of ``count`` samples (sizes differ by
    at most one)."""
    import numpy as np

    if count < folds:
        raise VadError(f"cross-fit calibration with {folds} folds needs at least {folds} training images, got {count}; lower folds")
    order = np.random.default_rng(seed).permutation(count)
    assignment = [0] * count
    for position, index in enumerate(order.tolist()):
        assignment[index] = position % folds
    return assignment


__all__ = ["CONFIDENCE", "METHODS", "conformal_rank", "false_alarm_estimate", "false_alarm_warning", "false_alarms_on", "fold_of", "smallest_certifiable_alpha", "split_hold_out"]
