"""vad-csflow: CS-Flow (Rudolph, Wehrbein, Rosenhahn, Wandt, WACV 2022) as an image detector.

``--detector csflow``: Fully Convolutional Cross-Scale-Flows. A frozen pretrained backbone
(default EfficientNet-Lite0, whose ImageNet weights ship offline; the paper's EfficientNet-B5
with a weights file) reads one feature layer of the image at full, half and quarter size; a
normalizing flow of cross-scale coupling blocks maps the three maps jointly to Gaussian latents.
The image score is the mean of ``z^2 / 2``, the anomaly map the channel mean of ``z^2`` at the
finest scale. :meth:`vad_csflow.detector.CsFlow.feature_source` exposes the latents for
feature-level ensembles. See :mod:`vad_csflow.detector` for hyper-parameters and deviations.
Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the CS-Flow detector."""
    register(
        "vad_csflow.detector:CsFlow",
        name="csflow",
        summary="CS-Flow: fully convolutional cross-scale normalizing flow on a frozen backbone's features at three input sizes (WACV 2022).",
    )
