"""vad-gcad: GCAD, Global Context Anomaly Detection (Bergmann et al., IJCV 2022; Bergmann's PhD
thesis ch. 7), as an image detector.

``--detector gcad``: per patch size (thesis 17 and 33) a local branch, the frozen Uninformed
Students patch teacher (:mod:`vad_uninformed_students.teacher`) regressed by a U-Net, finds
structural anomalies; a global branch, an encoder-decoder with a 32-d bottleneck distilled from
the teacher and regressed by a second U-Net, finds logical ones. Both maps are standardised over
held-out normal images and summed; the patch sizes are averaged.
:meth:`vad_gcad.detector.Gcad.feature_source` exposes the global features and the regression
residuals for feature-level ensembles. Teachers come from ``vad uninformed-students distill``
(``teacher_weights``) or are distilled in fit. See :mod:`vad_gcad.detector` for hyper-parameters
and deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the GCAD detector."""
    register(
        "vad_gcad.detector:Gcad",
        name="gcad",
        summary="GCAD: patch-teacher regression plus a bottlenecked global branch for logical anomalies (IJCV 2022, Bergmann thesis ch. 7).",
    )
