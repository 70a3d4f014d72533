"""vad-dfm: DFM (Ahuja et al., arXiv:1909.11786, 2019) as a vad plugin.

Registers the detector ``dfm`` lazily (by import path), so importing this entry module does not
import torch. :mod:`vad_dfm.pca` holds the pooled image vectors and the PCA that DFKDE
(``vad-dfkde``) reuses; :mod:`vad_dfm.detector` the detector.

The reference features: ``--backbone resnet50 --layer layer3 --aggregation 1 --image-size 256``.
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register DFM."""
    register(
        "vad_dfm.detector:DFM",
        name="dfm",
        summary="DFM: PCA of pooled deep features, feature reconstruction error maps or Gaussian NLL (reference: resnet50 layer3, --aggregation 1)",
    )
