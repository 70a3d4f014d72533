"""vad-simplenet: SimpleNet (Liu et al., CVPR 2023) as a detector head on any FeatureSource.

``--detector simplenet``: a linear feature adaptor, Gaussian-noise synthetic anomalous
features and a two-layer MLP discriminator trained with the truncated L1 loss; see
:mod:`vad_simplenet.detector` for hyper-parameters and deviations from the official code.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the SimpleNet detector head."""
    register(
        "vad_simplenet.detector:SimpleNet",
        name="simplenet",
        summary="SimpleNet: feature adaptor + Gaussian-noise fake features + MLP discriminator (CVPR 2023).",
    )
