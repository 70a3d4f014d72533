"""vad-variation-model: Steger's variation model (HALCON, the MVTec AD paper's baseline) as a vad plugin.

Registers the detector ``variation-model`` lazily (by import path), so importing this entry
module does not import torch. :mod:`vad_variation_model.statistics` holds the per-pixel
statistics and the map, :mod:`vad_variation_model.alignment` the phase-correlation registration,
:mod:`vad_variation_model.detector` the detector, its saved state and its ONNX head.
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register the variation model."""
    register(
        "vad_variation_model.detector:VariationModel",
        name="variation-model",
        summary="Variation model: per-pixel mean and std of aligned good images, |x - mean| / max(a_abs, b_rel * std)",
    )
