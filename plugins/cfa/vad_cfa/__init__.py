"""vad-cfa: CFA (Lee, Lee, Song, IEEE Access 2022) as an image detector.

``--detector cfa``: Coupled-hypersphere-based Feature Adaptation. A trainable patch descriptor
(1 x 1 CoordConv over frozen backbone levels) learns on normal images to pull each patch inside
a hypersphere around its nearest centroids of a fixed memory bank and to push the next ones out;
the anomaly map is the softmin-weighted distance to the nearest centroid, the image score the
maximum of the smoothed map. :meth:`vad_cfa.detector.Cfa.feature_source` exposes the adapted
patch descriptors for feature-level ensembles. See :mod:`vad_cfa.detector` for hyper-parameters
and deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the CFA detector."""
    register(
        "vad_cfa.detector:Cfa",
        name="cfa",
        summary="CFA: patch descriptor adapted to a memory bank by coupled-hypersphere losses (IEEE Access 2022).",
    )
