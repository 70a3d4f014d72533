"""vad-cflow: CFLOW-AD (Gudovskiy, Ishizaka, Kozuka, WACV 2022) as an image detector.

``--detector cflow``: a frozen pretrained encoder gives three feature levels; at each, a
conditional normalizing flow (FrEIA couplings conditioned on a 2-D positional encoding) learns
the likelihood of the normal feature vectors, trained on random batches of positions. The
anomaly map is the sum over the levels of the upsampled, normalised likelihoods, inverted; the
image score is its maximum. :meth:`vad_cflow.detector.Cflow.feature_source` exposes the flows'
latents for feature-level ensembles. See :mod:`vad_cflow.detector` for hyper-parameters and
deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the CFLOW-AD detector."""
    register(
        "vad_cflow.detector:Cflow",
        name="cflow",
        summary="CFLOW-AD: conditional normalizing flows on a frozen encoder's levels, likelihood maps (WACV 2022).",
    )
