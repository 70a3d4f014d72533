"""vad plugin template: registers one detector, ``feature-distance``.

The entry module only registers: it names the class by import path, so ``vad --help`` and
``vad plugins`` never import torch. The method itself lives in :mod:`vad_template.detector`.
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register the template's detector."""
    register(
        "vad_template.detector:FeatureDistance",
        name="feature-distance",
        summary="Per-patch distance to the mean normal feature at that position (template plugin).",
    )
