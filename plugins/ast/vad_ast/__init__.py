"""vad-ast: AST (Rudolph, Wehrbein, Rosenhahn, Wandt, WACV 2023) as an image detector.

``--detector ast``: Asymmetric Student-Teacher networks. A normalizing flow, conditioned on a
positional encoding, is first trained on normal feature maps of a frozen pretrained backbone
(the teacher); then a conventional convolutional network, which is not invertible (the
student), learns to regress the teacher's outputs ``z``. The anomaly map is the per-position
squared student-teacher distance. :meth:`vad_ast.detector.Ast.feature_source` exposes the
student-teacher differences (or the student's outputs) for feature-level ensembles. See
:mod:`vad_ast.detector` for hyper-parameters and deviations. Registration is lazy: this module
does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the AST detector."""
    register(
        "vad_ast.detector:Ast",
        name="ast",
        summary="AST: a convolutional student regressing a normalizing-flow teacher's latents (WACV 2023).",
    )
