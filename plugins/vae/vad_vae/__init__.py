"""vad-vae: the variational autoencoder of Bergmann's thesis (Ch. 3 and 6) as an image detector.

``--detector vae``: the ``autoencoder`` plugin's network with its latent convolution duplicated
to predict the posterior variance, trained on the negative ELBO; the anomaly map is the negative
log of the per-pixel reconstruction probability of several posterior samples (An & Cho 2015),
the image score its maximum. See :mod:`vad_vae.detector` for hyper-parameters and deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the VAE detector."""
    register(
        "vad_vae.detector:Vae",
        name="vae",
        summary="VAE: reconstruction probability of posterior samples of a variational autoencoder trained on normal images (Bergmann's thesis).",
    )
