"""vad-autoencoder: the L2- and SSIM-Autoencoder (Bergmann et al., VISAPP 2019) as an image detector.

``--detector autoencoder``: a convolutional autoencoder (Bergmann's thesis, Table 3.1, with the
MVTec AD benchmark's extra layer for 256 px inputs) trained on augmented normal samples;
``loss=l2`` (default) or ``loss=ssim`` chooses both the training loss and the anomaly map
(per-pixel squared L2, or 1 - SSIM on grayscale). The image score is the map's maximum.
:meth:`vad_autoencoder.detector.AutoencoderBase.feature_source` exposes the encoder's layers;
the ``vae`` plugin builds on the same network and training. See :mod:`vad_autoencoder.detector`
for hyper-parameters and deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the autoencoder detector."""
    register(
        "vad_autoencoder.detector:Autoencoder",
        name="autoencoder",
        summary="L2- or SSIM-Autoencoder: reconstruction residuals of an autoencoder trained on normal images (VISAPP 2019).",
    )
