"""vad-ddad: DDAD (Mousakhan, Brox, Tayyub, arXiv 2305.15956) as an image detector.

``--detector ddad``: Anomaly Detection with Conditioned Denoising Diffusion Models. A denoising
diffusion UNet learns the normal images; at test time each image is partially noised and
denoised with DDIM steps conditioned on the image itself, so the reconstruction keeps the
image's normal content and drops what the UNet never saw. The anomaly map adds the pixel
distance (rescaled) to the feature distance of a pretrained extractor that a domain adaptation
fine-tuned on the UNet's reconstructions; the image score is the maximum of the smoothed map.
:meth:`vad_ddad.detector.Ddad.feature_source` exposes the adapted extractor's features. See
:mod:`vad_ddad.detector` for hyper-parameters and deviations. Registration is lazy: this module
does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the DDAD detector."""
    register(
        "vad_ddad.detector:Ddad",
        name="ddad",
        summary="DDAD: conditioned denoising diffusion reconstruction, pixel + domain-adapted feature distances (arXiv 2305.15956).",
    )
