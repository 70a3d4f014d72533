"""vad-dfkde: anomalib's deep-feature kernel density estimation (DFKDE) as a vad plugin.

Registers the detector ``dfkde`` lazily (by import path), so importing this entry module does not
import torch. :mod:`vad_dfkde.kde` is the Gaussian KDE with Scott's bandwidth,
:mod:`vad_dfkde.detector` the detector; the pooled vectors and the PCA come from vad-dfm.

The reference features: ``--backbone resnet18 --layer layer4 --aggregation 1 --image-size 256``.
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register DFKDE."""
    register(
        "vad_dfkde.detector:DFKDE",
        name="dfkde",
        summary="DFKDE: PCA of globally pooled deep features, Gaussian KDE (Scott's bandwidth); image scores only (reference: resnet18 layer4, --aggregation 1)",
    )
