"""vad-patchcore: the PatchCore detector (Roth et al., CVPR 2022) as a vad plugin.

Registers the detector ``patchcore`` lazily (by import path) so that importing this entry
module does not import torch. The numerical parts are plain functions and modules:
:mod:`vad_patchcore.coreset` (approximate greedy k-center), :mod:`vad_patchcore.knn` (the
nearest-neighbour search strategies), :mod:`vad_patchcore.pruned` (exact cell-pruned search),
:mod:`vad_patchcore.scoring` (image scores, Eq. 7) and :mod:`vad_patchcore.detector` (the
streaming memory-bank detector).
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register PatchCore."""
    register(
        "vad_patchcore.detector:PatchCore",
        name="patchcore",
        summary="PatchCore: coreset memory bank of patch features, nearest-neighbour anomaly scores",
    )
