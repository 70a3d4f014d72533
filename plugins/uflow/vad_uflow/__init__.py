"""vad-uflow: U-Flow (Tailanian, Pardo, Musé 2022) as an image detector, and its a-contrario threshold.

``--detector uflow``: a frozen pretrained backbone's multi-scale features, a trainable LayerNorm
per scale and a U-shaped normalizing flow (FrEIA couplings) trained by maximum likelihood; the
anomaly map is one minus the latents' mean likelihood (``score=likelihood``) or ``-log10`` of
the a-contrario number of false alarms (``score=nfa``).
``--threshold nfa`` decides at NFA < epsilon (official epsilon 1) without validation images,
for ``-log10 NFA`` scores. :meth:`vad_uflow.detector.UFlow.feature_source` exposes the latents for
feature-level ensembles. See :mod:`vad_uflow.detector` for hyper-parameters and deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the U-Flow detector."""
    register(
        "vad_uflow.detector:UFlow",
        name="uflow",
        summary="U-Flow: U-shaped normalizing flow on multi-scale features, likelihood or a-contrario NFA maps (2022).",
    )


@hookimpl
def vad_register_thresholds(register):
    """Register the a-contrario NFA threshold."""
    register(
        "vad_uflow.threshold:NfaThreshold",
        name="nfa",
        summary="A-contrario: NFA < epsilon (epsilon=1), for -log10 NFA scores (--set uflow.score=nfa); no validation needed.",
    )
