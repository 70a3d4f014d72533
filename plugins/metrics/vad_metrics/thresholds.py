"""Decision thresholds fitted on validation scores; ``score >= threshold`` is anomalous.

Rules on *normal* validation scores (Bergmann's thesis §4.5 and seed 001's report §A.5, which
compares them; labels equal to 1 are ignored by these rules):

* ``max`` -- the largest normal score (the most conservative; one outlier sets it). Returned as
  the next float above it, so that under ``score >= threshold`` no normal validation score is
  flagged, as under the papers' ``score > t``.
* ``quantile`` -- ``Q_q`` of the normal scores, ``q = 0.99`` by default (seed 001: 0.95-0.99),
  NumPy's default linear interpolation: a fraction ``q`` of normal scores lies below it.
* ``k-sigma`` -- ``mean + k * std`` of the normal scores, ``k = 3`` by default (seed 001 and its
  FeatCAE; population std, ``ddof=0``).

On labelled validation data: ``f1-optimal`` -- the threshold maximising F1 (anomalous images
required; without them it is an error that names the rules above). ``manual`` -- a given value.

:func:`normalize_scores` maps raw scores so that the threshold lands on 0.5; raw scores are
always kept by the caller.
"""

from __future__ import annotations

import math

import numpy as np

from vad.contracts import Threshold
from vad.errors import VadError
from vad.options import REQUIRED, option
from vad_metrics.image import check_scores

NORMAL_ONLY_RULES = "conformal, max, quantile, k-sigma (fitted on normal validation scores) or manual (--set manual.value=…)"
#: Fewer normal scores than this make k-sigma warn.
FEW_SCORES = 30


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = check_scores(
        scores, labels, empty="no validation scores to fit a threshold on; raise --validation-fraction above 0"
    )
    return scores, labels.astype(bool)


def _normal_scores(scores, labels, rule: str) -> np.ndarray:
    scores, labels = _scores_labels(scores, labels)
    normal = scores[~labels]
    if normal.size == 0:
        raise VadError(f"threshold {rule!r} is fitted on normal validation scores, but every validation sample is anomalous")
    return normal


def max_threshold(scores, labels) -> float:
    """Smallest float above the largest normal score (no normal validation score flagged)."""
    return float(np.nextafter(_normal_scores(scores, labels, "max").max(), np.inf))


def quantile_threshold(scores, labels, q: float = 0.99) -> float:
    """The ``q`` quantile of the normal scores (linear interpolation)."""
    return float(np.quantile(_normal_scores(scores, labels, "quantile"), q))


def k_sigma_threshold(scores, labels, k: float = 3.0) -> float:
    """``mean + k * std`` of the normal scores (population std). One score has no spread, so it
    is refused; scores without spread give the smallest float above them (a threshold equal to
    them would flag the very normals it was fitted on)."""
    normal = _normal_scores(scores, labels, "k-sigma")
    if normal.size < 2:
        raise VadError(
            f"the k-sigma threshold needs at least 2 normal calibration scores to estimate their spread, got {normal.size}; "
            "add normal training images, or use the conformal threshold, which states the false-alarm rate any number of scores certifies"
        )
    spread = normal.std()
    if spread == 0:
        return float(np.nextafter(normal.mean(), np.inf))
    return float(normal.mean() + k * spread)


def conformal_threshold(scores, labels, alpha: float) -> float:
    """The smallest float above the ``ceil((n + 1)(1 - alpha))``-th smallest of the ``n`` normal
    scores: a new normal score (exchangeable with them) reaches it with probability at most
    ``alpha``. With too few scores for ``alpha`` it warns, says which rate ``n`` scores certify,
    and returns the ``max`` rule's threshold (which certifies ``1 / (n + 1)``)."""
    from vad.calibration import conformal_rank, smallest_certifiable_alpha

    normal = np.sort(_normal_scores(scores, labels, "conformal"))
    n = normal.size
    rank = conformal_rank(n, alpha)
    if rank > n:
        from vad.progress import warn

        certified = smallest_certifiable_alpha(n)
        warn(
            f"conformal threshold: {n} normal calibration scores cannot certify a false-alarm rate of {alpha:g} "
            f"(that needs at least {math.ceil(1 / alpha - 1)}); the threshold is above every score, which certifies "
            f"{certified:.3g}; train on more normal images to reach {alpha:g}"
        )
        rank = n
    return float(np.nextafter(normal[rank - 1], np.inf))


def f1_optimal_threshold(scores, labels) -> float:
    """The threshold with the best F1 on labelled scores (the highest one among equal F1)."""
    from vad_metrics.pixel import f1_max_from_split

    scores, labels = _scores_labels(scores, labels)
    if not labels.any():
        raise VadError(
            "threshold 'f1-optimal' needs anomalous validation samples, but all are normal; "
            f"use a threshold that fits normal-only data: {NORMAL_ONLY_RULES}"
        )
    if labels.all():
        # every score is anomalous: flag all of them
        return float(scores.min())
    return f1_max_from_split(scores[~labels], scores[labels])[1]


def normalize_scores(scores, threshold: float, min_value: float, max_value: float, clip: bool = True) -> np.ndarray:
    """Scores rescaled so that ``threshold`` maps to 0.5 (anomalib's min-max normalisation).

    ``normalized = (score - threshold) / (max_value - min_value) + 0.5``, clipped to [0, 1] when
    ``clip``; ``min_value`` / ``max_value`` are the score range seen on validation (or test)
    data. It is monotone, so every ranking metric is unchanged, and ``score >= threshold`` iff
    ``normalized >= 0.5`` (up to clipping of values that are far outside the range).
    """
    span = float(max_value) - float(min_value)
    if not np.isfinite(span) or span <= 0:
        raise VadError(f"normalize_scores needs max_value > min_value, got min {min_value} and max {max_value}")
    normalized = (np.asarray(scores, dtype=np.float64) - float(threshold)) / span + 0.5
    return np.clip(normalized, 0.0, 1.0) if clip else normalized


# --------------------------------------------------------------------------- plugin classes


class F1OptimalThreshold(Threshold):
    """The threshold with the best F1 on labelled validation data (needs anomalous samples)."""

    name = "f1-optimal"
    needs_anomalous = True

    def fit(self, scores, labels) -> float:
        """See :func:`f1_optimal_threshold`."""
        return f1_optimal_threshold(scores, labels)


class MaxThreshold(Threshold):
    """Just above the largest normal validation score: no normal validation sample is flagged."""

    name = "max"

    def fit(self, scores, labels) -> float:
        """See :func:`max_threshold`."""
        return max_threshold(scores, labels)


class QuantileThreshold(Threshold):
    """The q-quantile of normal validation scores (option q, default 0.99)."""

    name = "quantile"

    class Options(Threshold.Options):
        q: float = option(0.99, "Quantile of the normal validation scores (seed 001: 0.95-0.99).", ge=0, le=1)

    def fit(self, scores, labels) -> float:
        """See :func:`quantile_threshold`."""
        return quantile_threshold(scores, labels, self.options.q)


class ConformalThreshold(Threshold):
    """A stated false-alarm rate alpha on normal parts: just above the ceil((n+1)(1-alpha))-th
    smallest of n held-out normal scores (split conformal; the guarantee holds for exchangeable normals)."""

    name = "conformal"

    class Options(Threshold.Options):
        alpha: float = option(0.05, "False-alarm rate to guarantee on normal parts, P(score >= threshold) <= alpha; needs n >= 1/alpha - 1 scores.", gt=0, lt=1)

    def fit(self, scores, labels) -> float:
        """See :func:`conformal_threshold`."""
        return conformal_threshold(scores, labels, self.options.alpha)


class KSigmaThreshold(Threshold):
    """mean + k * std of normal validation scores (option k, default 3)."""

    name = "k-sigma"
    min_scores = 2

    class Options(Threshold.Options):
        k: float = option(3.0, "Standard deviations above the mean of the normal validation scores (seed 001: 3).")

    def fit(self, scores, labels) -> float:
        """See :func:`k_sigma_threshold`; warns when fitted on few scores."""
        normal = _normal_scores(scores, labels, self.name)
        if normal.size < FEW_SCORES:
            from vad.progress import warn

            warn(
                f"k-sigma threshold fitted on {normal.size} normal scores: their mean and std are uncertain, and so is "
                "its false-alarm rate (the report shows the interval); the conformal threshold states its rate"
            )
        return k_sigma_threshold(scores, labels, self.options.k)


class ManualThreshold(Threshold):
    """A fixed threshold given as option value (--set manual.value=…)."""

    name = "manual"
    needs_validation = False

    class Options(Threshold.Options):
        value: float = option(REQUIRED, "The threshold; scores at or above it are anomalous.")

    tiny_options = {"value": 0.5}

    def fit(self, scores, labels) -> float:
        """The given value (the validation scores are not used)."""
        return self.options.value
