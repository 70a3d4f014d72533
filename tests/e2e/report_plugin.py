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
    from vad.errors import VadError
    from vad.options import option

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

        class Options(Detector.Options):
            exportable: bool = option(True, "Offer an ONNX export module.")

        def __init__(self, **options) -> None:
            super().__init__(**options)
            self.mean = None

        @property
        def fitted(self):
            return self.mean is not None

        def fit(self, batches):
            total, count = None, 0
            for batch in batches:
                total = batch.float().sum(0) if total is None else total + batch.float().sum(0)
                count += batch.shape[0]
            if total is None:
                raise VadError("report-distance needs normal training images")
            self.mean = total / count

        def predict(self, batch):
            if self.mean is None:
                raise VadError("report-distance is not fitted: call fit() before predict()")
            if batch.ndim != 4 or batch.shape[1:] != self.mean.shape:
                raise VadError(f"report-distance takes feature grids [B, *{tuple(self.mean.shape)}], got {tuple(batch.shape)}")
            with torch.inference_mode():
                scores, maps = DistanceHead(self.mean.to(batch.device))(batch.float())
            return Prediction(scores, maps)

        def export_module(self):
            return DistanceHead(self.mean) if self.options.exportable else None

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
            from scipy.stats import rankdata

            labels = np.asarray(data.labels).astype(bool)
            ranks = rankdata(data.scores)
            positives, negatives = labels.sum(), (~labels).sum()
            return {"image_auroc": float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))}

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
