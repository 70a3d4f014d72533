"""vad-reverse-distillation: Reverse Distillation (Deng & Li, CVPR 2022) as an image detector.

``--detector reverse-distillation``: a frozen pretrained encoder (the teacher; default
EfficientNet-Lite0, whose ImageNet weights ship offline; the paper's WideResNet-50-2 and
ResNet-18/34/50 get the official networks), a trainable one-class bottleneck embedding and a
reverse decoder (the student) trained with the official cosine loss; the anomaly map is the sum
of the per-level ``1 - cosine`` maps and the image score its maximum after Gaussian smoothing.
:meth:`vad_reverse_distillation.detector.ReverseDistillation.feature_source` exposes the
one-class embedding for feature-level ensembles. See :mod:`vad_reverse_distillation.detector`
for hyper-parameters and deviations. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the Reverse Distillation detector."""
    register(
        "vad_reverse_distillation.detector:ReverseDistillation",
        name="reverse-distillation",
        summary="Reverse Distillation: frozen encoder, one-class bottleneck embedding, reverse decoder (CVPR 2022).",
    )
