"""vad-metrics: evaluation metrics and decision thresholds (``vad list metrics``, ``vad list thresholds``).

Metrics (image level): ``image_auroc``, ``image_ap``, ``image_f1_max`` (+ its threshold),
``image_f1`` and ``image_accuracy`` at the model's threshold. Pixel level, over all pixels at each
image's original resolution: ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max``, ``pixel_iou`` (at
the pixel threshold), ``pixel_pro_anomalib`` (anomalib's single-threshold PRO, for comparisons),
``au_pro`` (MVTec AD, option ``fpr_limit=0.3``) and ``au_spro`` (MVTec LOCO, structural /
logical / mean, option ``fpr_limit=0.3``).

Thresholds (``score >= threshold`` is anomalous): ``conformal`` (``alpha=0.05``), ``f1-optimal`` (labelled validation data),
``max``, ``quantile`` (``q=0.99``), ``k-sigma`` (``k=3``) on normal validation scores, ``manual``
(``value``).

The numerics are plain NumPy/SciPy functions in :mod:`vad_metrics.pro`,
:mod:`vad_metrics.pixel`, :mod:`vad_metrics.image` and :mod:`vad_metrics.thresholds`.
Registration is lazy: this module imports neither NumPy nor scikit-learn.
"""

from vad import hookimpl

__version__ = "0.1.0"

_METRICS = [
    ("ImageAUROC", "image_auroc", "Image-level area under the ROC curve."),
    ("ImageAP", "image_ap", "Image-level average precision."),
    ("ImageF1Max", "image_f1_max", "Best image-level F1 over all thresholds, and that threshold (oracle)."),
    ("ImageF1", "image_f1", "Image-level F1 at the model's image threshold."),
    ("ImageAccuracy", "image_accuracy", "Image-level accuracy at the model's image threshold."),
    ("ImageFalseAlarmRate", "image_false_alarm_rate", "Share of good test images flagged at the model's image threshold."),
    ("PixelAUROC", "pixel_auroc", "Pixel-level area under the full ROC curve (exact, sort-based)."),
    ("PixelAP", "pixel_ap", "Pixel-level average precision (exact, sort-based)."),
    ("PixelF1Max", "pixel_f1_max", "Best pixel-level F1 over all thresholds, and that threshold (oracle)."),
    ("PixelIoU", "pixel_iou", "Pixel IoU of the anomalous class at the model's pixel threshold."),
    ("PixelPROAnomalib", "pixel_pro_anomalib", "anomalib's single-threshold PRO at the pixel threshold (for comparisons)."),
    ("AUPRO", "au_pro", "Area under the PRO curve up to FPR 0.3, normalised; exact as the official MVTec AD code."),
    ("AUSPRO", "au_spro", "Area under the sPRO curve (MVTec LOCO) up to FPR 0.3: structural, logical and mean."),
]

_THRESHOLDS = [
    ("ConformalThreshold", "conformal", "A guaranteed false-alarm rate alpha on normal parts (alpha=0.05), from held-out normal scores."),
    ("F1OptimalThreshold", "f1-optimal", "Best F1 on labelled validation data (needs anomalous validation samples)."),
    ("MaxThreshold", "max", "Just above the largest normal validation score."),
    ("QuantileThreshold", "quantile", "q-quantile of normal validation scores (q=0.99)."),
    ("KSigmaThreshold", "k-sigma", "mean + k*std of normal validation scores (k=3)."),
    ("ManualThreshold", "manual", "A fixed value: --set manual.value=<number>."),
]


@hookimpl
def vad_register_metrics(register):
    """Register the image and pixel metrics."""
    for attribute, name, summary in _METRICS:
        register(f"vad_metrics.metrics:{attribute}", name=name, summary=summary)


@hookimpl
def vad_register_thresholds(register):
    """Register the threshold rules."""
    for attribute, name, summary in _THRESHOLDS:
        register(f"vad_metrics.thresholds:{attribute}", name=name, summary=summary)
