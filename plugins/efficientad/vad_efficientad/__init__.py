"""vad-efficientad: EfficientAD (Batzner, Heckler, König, WACV 2024) as an image detector.

``--detector efficientad``: a frozen PDN teacher (small or medium), a PDN student with twice its
output channels and an autoencoder; the student-teacher map finds local anomalies, the
autoencoder-student map logical ones; both are normalised by quantiles over held-out normal
images and averaged. :meth:`vad_efficientad.detector.EfficientAd.feature_source` exposes the
student's discrepancies for feature-level ensembles. ``vad efficientad distill`` distils a PDN
teacher from any vad backbone on any folder of images. See :mod:`vad_efficientad.detector` for
hyper-parameters and deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the EfficientAD detector."""
    register(
        "vad_efficientad.detector:EfficientAd",
        name="efficientad",
        summary="EfficientAD-S/M: PDN student-teacher plus autoencoder, quantile-normalised maps (WACV 2024).",
    )


@hookimpl
def vad_register_commands(app):
    """Add ``vad efficientad distill``."""
    from vad_efficientad.cli import efficientad_app

    app.add_typer(efficientad_app, name="efficientad")
