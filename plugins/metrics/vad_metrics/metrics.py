"""The registered :class:`vad.contracts.Metric` classes: thin wrappers over the functions in
:mod:`vad_metrics.image`, :mod:`vad_metrics.pixel` and :mod:`vad_metrics.pro`.

Each ``applicable`` returns why a metric cannot be computed (no maps, no masks, one class
only, no threshold, no LOCO regions) instead of producing a degenerate number.
"""

from __future__ import annotations

import numpy as np

from vad.contracts import Curve, EvaluationData, Metric
from vad_metrics import image, pixel, pro
from vad_metrics.pro import FprLimitOptions


# --------------------------------------------------------------------------- image level


def _image_reason(data: EvaluationData) -> str | None:
    labels = np.asarray(data.labels).ravel()
    if labels.size == 0:
        return "there are no test images"
    if labels.min() == labels.max():
        return f"all test images are {'anomalous' if labels[0] else 'good'}: the metric needs both classes"
    return None


class ImageAUROC(Metric):
    """Image-level area under the ROC curve."""

    name = "image_auroc"

    def applicable(self, data):
        """Needs good and anomalous test images."""
        return _image_reason(data)

    def compute(self, data):
        """scikit-learn's ``roc_auc_score`` on image scores."""
        return image.image_auroc(data.scores, data.labels)

    def curves(self, data):
        """The image ROC curve, labelled with its area."""
        fpr, tpr = image.image_roc_curve(data.scores, data.labels)
        label = f"AUROC {pro.trapezoid(fpr, tpr):.4f}"
        return [Curve("roc", fpr, tpr, "false positive rate", "true positive rate", label)]


class ImageAP(Metric):
    """Image-level average precision."""

    name = "image_ap"

    def applicable(self, data):
        """Needs good and anomalous test images."""
        return _image_reason(data)

    def compute(self, data):
        """scikit-learn's ``average_precision_score`` on image scores."""
        return image.image_average_precision(data.scores, data.labels)


class ImageF1Max(Metric):
    """Best image-level F1 over all thresholds, and that threshold."""

    name = "image_f1_max"

    def applicable(self, data):
        """Needs good and anomalous test images."""
        return _image_reason(data)

    def compute(self, data):
        """``{"image_f1_max": …, "image_f1_max_threshold": …}`` (an oracle: chosen on the test set)."""
        f1, threshold = image.image_f1_max(data.scores, data.labels)
        return {"image_f1_max": f1, "image_f1_max_threshold": threshold}


class ImageF1(Metric):
    """Image-level F1 at the model's image threshold."""

    name = "image_f1"

    def applicable(self, data):
        """Needs the model's image threshold and both classes."""
        if data.image_threshold is None:
            return "the model has no image threshold"
        return _image_reason(data)

    def compute(self, data):
        """F1 of ``score >= image_threshold``."""
        return image.f1_at(data.scores, data.labels, data.image_threshold)


class ImageAccuracy(Metric):
    """Image-level accuracy at the model's image threshold."""

    name = "image_accuracy"

    def applicable(self, data):
        """Needs the model's image threshold."""
        if data.image_threshold is None:
            return "the model has no image threshold"
        return None if np.asarray(data.labels).size else "there are no test images"

    def compute(self, data):
        """Share of images with ``(score >= image_threshold) == label``."""
        return image.accuracy_at(data.scores, data.labels, data.image_threshold)


class ImageFalseAlarmRate(Metric):
    """Share of good test images flagged at the model's image threshold (compare with the
    false-alarm rate the calibration expects)."""

    name = "image_false_alarm_rate"

    def applicable(self, data):
        """Needs the model's image threshold and good test images."""
        if data.image_threshold is None:
            return "the model has no image threshold"
        return None if (np.asarray(data.labels) == 0).any() else "there are no good test images"

    def compute(self, data):
        """``mean(score >= image_threshold)`` over good test images."""
        good = np.asarray(data.scores)[np.asarray(data.labels) == 0]
        return float(np.mean(good >= data.image_threshold))


# --------------------------------------------------------------------------- pixel level


def _pixel_reason(data: EvaluationData) -> str | None:
    if data.maps is None:
        return "the detector gives no anomaly maps"
    if data.masks is None:
        return "the data set has no pixel ground truth"
    if len(data.maps) != len(data.masks):
        return f"{len(data.maps)} anomaly maps but {len(data.masks)} masks"
    if not data.maps:
        return "there are no anomaly maps"
    any_positive = any(mask is not None and np.any(mask) for mask in data.masks)
    any_negative = any(mask is None or not np.all(mask) for mask in data.masks)
    if not any_positive:
        return "no ground-truth mask marks an anomalous pixel: the metric needs both classes"
    if not any_negative:
        return "every pixel is marked anomalous: the metric needs both classes"
    return None


class _PixelMetric(Metric):
    level = "pixel"

    def applicable(self, data):
        """Needs maps, masks, and both normal and anomalous pixels."""
        return _pixel_reason(data)


class PixelAUROC(_PixelMetric):
    """Pixel-level area under the full ROC curve, over all pixels of all test images."""

    name = "pixel_auroc"

    def compute(self, data):
        """Exact Mann-Whitney AUROC (equal to scikit-learn's), see :mod:`vad_metrics.pixel`."""
        return pixel.auroc_from_split(*pixel.split_pixels(data.maps, data.masks, data.roi))


class PixelAP(_PixelMetric):
    """Pixel-level average precision over all pixels of all test images."""

    name = "pixel_ap"

    def compute(self, data):
        """Exact average precision (equal to scikit-learn's)."""
        return pixel.average_precision_from_split(*pixel.split_pixels(data.maps, data.masks, data.roi))


class PixelF1Max(_PixelMetric):
    """Best pixel-level F1 over all thresholds, and that threshold."""

    name = "pixel_f1_max"

    def compute(self, data):
        """``{"pixel_f1_max": …, "pixel_f1_max_threshold": …}`` (an oracle: chosen on the test set)."""
        f1, threshold = pixel.f1_max_from_split(*pixel.split_pixels(data.maps, data.masks, data.roi))
        return {"pixel_f1_max": f1, "pixel_f1_max_threshold": threshold}


class PixelIoU(_PixelMetric):
    """Intersection over union of predicted and true anomalous pixels at the pixel threshold."""

    name = "pixel_iou"

    def applicable(self, data):
        """Needs the model's pixel threshold, maps, masks and both classes."""
        if data.pixel_threshold is None:
            return "the model has no pixel threshold"
        return _pixel_reason(data)

    def compute(self, data):
        """IoU of ``score >= pixel_threshold``, pooled over all pixels."""
        return pixel.iou_at(data.maps, data.masks, data.pixel_threshold, data.roi)


class PixelPROAnomalib(_PixelMetric):
    """Single-threshold PRO as anomalib 1.x computes it (for comparisons; not AU-PRO)."""

    name = "pixel_pro_anomalib"

    def applicable(self, data):
        """Needs the model's pixel threshold, maps, masks and both classes."""
        if data.pixel_threshold is None:
            return "the model has no pixel threshold"
        return _pixel_reason(data)

    def compute(self, data):
        """Mean recall of 8-connected regions at ``score > pixel_threshold``."""
        return pixel.pro_at_threshold_anomalib(data.maps, data.masks, data.pixel_threshold, data.roi)


class AUPRO(_PixelMetric):
    """Normalised area under the per-region-overlap curve up to an FPR limit (MVTec AD)."""

    name = "au_pro"
    Options = FprLimitOptions

    def compute(self, data):
        """See :func:`vad_metrics.pro.au_pro`."""
        return pro.au_pro(data.maps, data.masks, self.options.fpr_limit, data.roi)

    def curves(self, data):
        """The PRO curve up to the first point past ``fpr_limit`` (the points the area uses),
        labelled with the normalised area."""
        fprs, pros = pro.points_up_to(*pro.pro_curve(data.maps, data.masks, self.options.fpr_limit, data.roi), self.options.fpr_limit)
        label = f"AU-PRO({self.options.fpr_limit:g}) {pro.area_under_curve(fprs, pros, self.options.fpr_limit):.4f}"
        return [Curve("pro", fprs, pros, "pixel false positive rate", "per-region overlap", label, self.options.fpr_limit)]


class AUSPRO(Metric):
    """Normalised area under the saturated-PRO curve (MVTec LOCO), structural / logical / mean."""

    name = "au_spro"
    level = "pixel"
    Options = FprLimitOptions

    def applicable(self, data):
        """Needs maps and samples with annotated regions (MVTec LOCO)."""
        if data.maps is None:
            return "the detector gives no anomaly maps"
        if len(data.samples) != len(data.maps):
            return "the samples of the anomaly maps are not known"
        if not any(sample.regions for sample in data.samples):
            return "no sample has annotated regions with saturation thresholds (MVTec LOCO only)"
        if data.roi is not None:
            return "LOCO's annotated regions are defined on whole images; with a region of interest AU-sPRO is left out"
        return None

    def compute(self, data):
        """``au_spro`` (the mean over anomaly kinds, as the LOCO paper reports it) and
        ``au_spro_<kind>`` (e.g. structural, logical): each kind's anomalous images together
        with all good images. Anomalous samples without regions count as plain PRO over their
        mask's 8-connected components; anomalous samples with neither are left out (their pixels
        are not known to be normal). If some anomalous sample has no kind, ``au_spro`` is
        computed over all images instead of as the mean."""
        from scipy import ndimage

        regions_per_image = []
        for index, (sample, anomaly_map) in enumerate(zip(data.samples, data.maps)):
            if sample.regions:
                regions_per_image.append([(region.load_mask(), region.saturation_area) for region in sample.regions])
                continue
            mask = data.masks[index] if data.masks is not None else None
            if sample.label == 1 and mask is not None and np.any(mask):
                labeled, count = ndimage.label(np.asarray(mask, bool), structure=pro.EIGHT_CONNECTED)
                components = [labeled == number for number in range(1, count + 1)]
                regions_per_image.append([(component, float(component.sum())) for component in components])
            elif sample.label == 1:
                regions_per_image.append(None)  # anomalous without ground truth: left out
            else:
                regions_per_image.append([])

        def area(indices: list[int]) -> float:
            return pro.au_spro([data.maps[i] for i in indices], [regions_per_image[i] for i in indices], self.options.fpr_limit)

        good = [i for i, regions in enumerate(regions_per_image) if regions is not None and not regions]
        anomalous = [i for i, regions in enumerate(regions_per_image) if regions]
        kinds = sorted({data.samples[i].anomaly_kind for i in anomalous if data.samples[i].anomaly_kind})
        result: dict[str, float] = {}
        for kind in kinds:
            result[f"au_spro_{kind}"] = area(good + [i for i in anomalous if data.samples[i].anomaly_kind == kind])
        if kinds and all(data.samples[i].anomaly_kind for i in anomalous):
            result["au_spro"] = float(np.mean([result[f"au_spro_{kind}"] for kind in kinds]))
        else:
            result["au_spro"] = area(good + anomalous)
        return {"au_spro": result.pop("au_spro"), **result}
