"""A small test plugin for the report / predict / export / bench tests.

``report-distance``: per-patch distance to the mean normal patch (the template's method) with an
``export_module`` so ONNX export can be tested without PatchCore; ``report-max``: threshold at
the largest validation value; ``report-image-auroc``: image AUROC (used only when the metrics
plugin ``vad_metrics`` is not installed, so the tests run either way).
"""

from __future__ import annotations

import functools
import importlib.util

from vad import hookimpl

HAS_VAD_METRICS = importlib.util.find_spec("vad_metrics") is not None


@functools.lru_cache(maxsize=None)
def _classes():
    import numpy as np
    import torch

    from vad.contracts import Detector, Metric, Prediction, State, Threshold

    class DistanceHead(torch.nn.Module):
        """Traceable head: distance map to the mean feature, score = map maximum."""

        def __init__(self, mean: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("mean", mean.detach().clone())

        def forward(self, features: torch.Tensor):
            maps = (features - self.mean).pow(2).sum(1).sqrt()
            return maps.flatten(1).amax(1), maps

    class ReportDistance(Detector):
        """Distance of each patch to the mean normal patch at its position."""

        name = "report-distance"
        input = "features"

        def __init__(self, exportable: bool = True) -> None:
            self._hparams = {"exportable": exportable}
            self.exportable = exportable
            self.mean = None

        def fit(self, batches):
            total, count = None, 0
            for batch in batches:
                total = batch.float().sum(0) if total is None else total + batch.float().sum(0)
                count += batch.shape[0]
            self.mean = total / count

        def predict(self, batch):
            with torch.inference_mode():
                scores, maps = DistanceHead(self.mean.to(batch.device))(batch.float())
            return Prediction(scores, maps)

        def export_module(self):
            return DistanceHead(self.mean) if self.exportable else None

        def state(self):
            return State({}, {"mean": self.mean})

        def load_state(self, state):
            self.mean = state.tensors["mean"]

    class ReportMax(Threshold):
        """The largest validation value."""

        name = "report-max"

        def fit(self, scores, labels):
            return float(np.max(scores))

    class ReportImageAuroc(Metric):
        """Image AUROC by the rank statistic."""

        name = "report-image-auroc"

        def compute(self, data):
            from vad.report import roc_curve, trapezoid_area

            fpr, tpr, _ = roc_curve(data.scores, data.labels)
            return {"image_auroc": trapezoid_area(fpr, tpr)}

    return ReportDistance, ReportMax, ReportImageAuroc


class ReportTestPlugin:
    """Registers the classes above."""

    @hookimpl
    def vad_register_detectors(self, register):
        register(_classes()[0])

    @hookimpl
    def vad_register_thresholds(self, register):
        register(_classes()[1])

    @hookimpl
    def vad_register_metrics(self, register):
        if not HAS_VAD_METRICS:
            register(_classes()[2])
