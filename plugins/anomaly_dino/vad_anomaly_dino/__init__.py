"""vad-anomaly-dino: AnomalyDINO (Damm et al., WACV 2025) as an image detector.

``--detector anomaly-dino``: the patch tokens of DINOv2 ViT-S/14 (through vad-timm) of a few
normal reference images, and of their rotations, form a memory bank; a test patch scores its
cosine distance to the nearest bank patch, an image the mean of its 1 % largest patch scores;
optional zero-shot masking of the background by the first principal component of the patch
features. See :mod:`vad_anomaly_dino.detector` for the official settings and the deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register AnomalyDINO."""
    register(
        "vad_anomaly_dino.detector:AnomalyDINO",
        name="anomaly-dino",
        summary="AnomalyDINO: few-shot memory bank of DINOv2 patch features, cosine nearest neighbours, mean of the top 1 % (WACV 2025).",
    )
