"""vad-gmm-texture: the GMM-based texture inspection model (Böttger and Ulrich 2016; HALCON; a
baseline of the MVTec AD paper) as a vad plugin.

Registers the detector ``gmm-texture`` lazily (by import path), so importing this entry module
does not import torch. :mod:`vad_gmm_texture.model` holds the pyramid, the patch features and the
mixture likelihood in torch, :mod:`vad_gmm_texture.detector` the fit (scikit-learn's EM), the
saved state and the ONNX head.
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register the GMM texture model."""
    register(
        "vad_gmm_texture.detector:GmmTexture",
        name="gmm-texture",
        summary="GMM texture inspection: a Gaussian mixture of 7x7 gray patches per pyramid level, NLL maps (MVTec AD baseline)",
    )
