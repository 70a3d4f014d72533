"""vad-padim: the PaDiM detector (Defard et al., ICPR Workshops 2021) as a vad plugin.

Registers the detector ``padim`` lazily (by import path) so that importing this entry module
does not import torch. The numerical parts: :mod:`vad_padim.reduction` (random channel subset,
PCA), :mod:`vad_padim.gaussian` (streaming per-position Gaussians, Mahalanobis distance) and
:mod:`vad_padim.detector` (the detector, its memory bound and saved state).

The paper's features: ``--layer layer1 --layer layer2 --layer layer3 --aggregation 1``.
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register PaDiM."""
    register(
        "vad_padim.detector:PaDiM",
        name="padim",
        summary="PaDiM: a Gaussian per patch position, Mahalanobis distance (paper layers: layer1-3, --aggregation 1)",
    )
