"""vad-fre: FRE (Ndiour, Ahuja, Genc and Tickoo, "FRE: A Fast Method For Anomaly Detection And
Segmentation", BMVC 2023; arXiv 2211.12650) as an image detector.

``--detector fre``: a frozen pretrained backbone's map at one level (ResNet ``layer3``) is
average-pooled and flattened into one vector per image; a shallow linear autoencoder (tied
weights by default, or the closed-form PCA it converges to) learns the subspace the training
vectors span. The feature reconstruction error, rearranged as the feature tensor, gives the
anomaly map (its channel mean) and the image score (its l2-norm).
:meth:`vad_fre.detector.Fre.feature_source` exposes the residual features. See
:mod:`vad_fre.detector` for hyper-parameters and deviations. Registration is lazy: this module
does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the FRE detector."""
    register(
        "vad_fre.detector:Fre",
        name="fre",
        summary="FRE: feature reconstruction error of a shallow linear autoencoder (or PCA) on frozen backbone features (BMVC 2023).",
    )
