"""The a-contrario decision of U-Flow as a vad threshold rule (``--threshold nfa``).

U-Flow's detection needs no validation images: a pixel is anomalous when its number of false
alarms is below ``epsilon``, ``log10 NFA < log10 epsilon`` (official epsilon 1, i.e. log NFA < 0:
on average at most ``epsilon`` false detections per normal image under the null model; the
official ``miou`` evaluation thresholds ``-log NFA > 0``). With ``--detector uflow --set
uflow.score=nfa`` the scores and maps are ``-log10 NFA``, so the threshold is the fixed value
``-log10 epsilon`` (returned as the next float above it, so that vad's ``score >= threshold``
is the official strict ``>``); the image is flagged when one of its pixels is.

The rule is meaningful only for scores that are ``-log10 NFA``: it declares so
(``requires_scores``), and vad refuses it for any detector whose ``score_kind`` differs (uflow
with ``score=likelihood``, every other detector) and for score-level ensembles.
"""

from __future__ import annotations

import math

import numpy as np

from vad.contracts import Threshold
from vad.options import option
from vad_uflow.nfa import NFA_SCORES


def nfa_threshold(epsilon: float) -> float:
    """The smallest float above ``-log10 epsilon``: ``-log10 NFA >= it`` iff ``NFA < epsilon``."""
    return float(np.nextafter(-math.log10(epsilon), np.inf))


class NfaThreshold(Threshold):
    """Detections where NFA < epsilon, for -log10 NFA scores (uflow score=nfa); needs no validation data."""

    name = "nfa"
    needs_validation = False
    requires_scores = NFA_SCORES

    class Options(Threshold.Options):
        epsilon: float = option(1.0, "Tolerated false detections per normal image on average (official 1: log10 NFA < 0); scores must be -log10 NFA (uflow score=nfa).", gt=0)

    def fit(self, scores, labels) -> float:
        """``-log10 epsilon`` (just above it); the validation scores are not used."""
        return nfa_threshold(self.options.epsilon)
