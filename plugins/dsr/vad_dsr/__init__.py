"""vad-dsr: DSR (Zavrtanik, Kristan, Skočaj, ECCV 2022) as an image detector.

``--detector dsr``: a two-level VQ-VAE quantizes images into codes; subspace restriction modules
restore the codes to normal appearance, an object-specific decoder renders them, and a U-Net
compares that image with the VQ-VAE's general reconstruction; an up-sampling U-Net refines the
map. Training makes anomalies in code space (no external data). ``vad dsr pretrain-vq``
pretrains the VQ-VAE on any folder of images (official: ImageNet, not downloadable here).
:meth:`vad_dsr.detector.Dsr.feature_source` exposes the codes for feature-level ensembles. See
:mod:`vad_dsr.detector` for hyper-parameters and deviations. Registration is lazy: this module
does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the DSR detector."""
    register(
        "vad_dsr.detector:Dsr",
        name="dsr",
        summary="DSR: dual subspace re-projection on VQ-VAE codes, trained on code-space anomalies (ECCV 2022).",
    )


@hookimpl
def vad_register_commands(app):
    """Add ``vad dsr pretrain-vq``."""
    from vad_dsr.cli import dsr_app

    app.add_typer(dsr_app, name="dsr")
