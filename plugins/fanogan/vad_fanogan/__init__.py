"""vad-fanogan: f-AnoGAN (Schlegl, Seeböck, Waldstein, Langs, Schmidt-Erfurth, Medical Image
Analysis 2019) as an image detector.

``--detector f-anogan``: a Wasserstein GAN with gradient penalty learns to generate 64 x 64 grey
patches of normal images; an izi_f encoder then learns to map patches to the latent vectors
whose generated patches match them in pixels and in the critic's features. Images are scored
patch by patch: the map is the per-pixel squared residual ``(x - G(E(x)))^2``, the image score
the largest izi_f residual of its patches. Defaults follow Bergmann's thesis on MVTec AD (the
official code, 256 px images, 64 px patches). :meth:`vad_fanogan.detector.FAnoGan.feature_source`
exposes the critic's features. See :mod:`vad_fanogan.detector` for hyper-parameters and
deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the f-AnoGAN detector."""
    register(
        "vad_fanogan.detector:FAnoGan",
        name="f-anogan",
        summary="f-AnoGAN: WGAN-GP on grey patches plus an izi_f encoder, patchwise residual scoring (MedIA 2019).",
    )
