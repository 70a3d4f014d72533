"""vad-ganomaly: GANomaly (Akcay, Atapour-Abarghouei, Breckon, ACCV 2018) as an image detector.

``--detector ganomaly``: a generator made of an encoder, a decoder and a second encoder learns,
adversarially against a discriminator, to reconstruct normal images; the image score is the
distance between the latent code of the image and that of its reconstruction. Image-level only
(no anomaly maps). :meth:`vad_ganomaly.detector.Ganomaly.feature_source` exposes the first
encoder's feature maps. See :mod:`vad_ganomaly.detector` for hyper-parameters and deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the GANomaly detector."""
    register(
        "vad_ganomaly.detector:Ganomaly",
        name="ganomaly",
        summary="GANomaly: encoder-decoder-encoder GAN, score = distance between the two latent codes (ACCV 2018); image-level only.",
    )
