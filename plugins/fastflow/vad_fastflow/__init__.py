"""vad-fastflow: FastFlow (Yu et al., arXiv 2111.07677, 2021) as an image detector.

``--detector fastflow``: a frozen pretrained backbone gives feature maps at strides 4, 8 and 16;
each is layer-normalised and mapped by its own 2D normalizing flow (FrEIA affine couplings with
convolutional subnetworks) to a standard normal latent map; training maximises the likelihood of
normal features. The anomaly map is minus the per-position probability ``exp(-mean_c z^2 / 2)``,
averaged over the scales at the input size; the image score is its maximum.
:meth:`vad_fastflow.detector.FastFlow.feature_source` exposes the latent maps for feature-level
ensembles. See :mod:`vad_fastflow.detector` for hyper-parameters and deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the FastFlow detector."""
    register(
        "vad_fastflow.detector:FastFlow",
        name="fastflow",
        summary="FastFlow: 2D normalizing flows on frozen backbone feature maps, likelihood as the anomaly map (arXiv 2111.07677).",
    )
