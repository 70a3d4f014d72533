"""vad-draem: DRAEM (Zavrtanik, Kristan, Skocaj, ICCV 2021) as an image detector.

``--detector draem``: a reconstructive sub-network and a discriminative U-Net trained on
synthetic anomalies from :mod:`vad_augment` (Perlin + texture by default; seed 001's cutout with
``--set draem.anomalies='["perlin","cutout"]'``) with L2 + SSIM + focal loss, as the official
code. Maps are the anomaly softmax; the image score is the maximum of the 21x21 mean-filtered
map. :meth:`vad_draem.detector.Draem.feature_source` exposes the discriminative encoder's
features for feature-level ensembles. See :mod:`vad_draem.detector` for hyper-parameters and
deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the DRAEM detector."""
    register(
        "vad_draem.detector:Draem",
        name="draem",
        summary="DRAEM: reconstructive + discriminative sub-networks trained on synthetic anomalies (ICCV 2021).",
    )
