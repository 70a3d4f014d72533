"""vad-feature-ae: the feature autoencoder of seed 003 (a DFR-style 1x1-convolution "FeatCAE",
Shi, Yang and Qi, "Unsupervised anomaly segmentation via deep feature reconstruction",
Neurocomputing 2021) as a detector head on any FeatureSource.

``--detector feature-ae``: an autoencoder of 1x1 convolutions with BatchNorm and ReLU
reconstructs every patch feature of the grid; the anomaly map is the squared reconstruction
error averaged over the channels, the image score its maximum. See
:mod:`vad_feature_ae.detector` for hyper-parameters and deviations. Registration is lazy: this
module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the feature autoencoder detector head."""
    register(
        "vad_feature_ae.detector:FeatureAE",
        name="feature-ae",
        summary="Feature autoencoder: 1x1-conv FeatCAE reconstructing backbone features (DFR, Neurocomputing 2021; seed 003).",
    )
