"""vad-stfpm: STFPM (Wang, Han, Ding, Huang, BMVC 2021) as an image detector.

``--detector stfpm``: Student-Teacher Feature Pyramid Matching. A student network with the
teacher's architecture, randomly initialised, learns on normal images to match the frozen
pretrained teacher's L2-normalised feature maps at three pyramid levels; the anomaly map is the
product of the per-level discrepancies and the image score its maximum.
:meth:`vad_stfpm.detector.Stfpm.feature_source` exposes the teacher-student discrepancy vectors
for feature-level ensembles. See :mod:`vad_stfpm.detector` for hyper-parameters and deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the STFPM detector."""
    register(
        "vad_stfpm.detector:Stfpm",
        name="stfpm",
        summary="STFPM: student trained to match a frozen pretrained teacher's feature pyramid (BMVC 2021).",
    )
