"""A small but real detector: distance of each patch to the mean normal patch at its position.

It is PaDiM with an identity covariance: fit averages the training feature grids position by
position (streaming, one grid in memory); predict returns the Euclidean distance map and its
maximum as the image score. A training image left out of the mean is ``n / (n - 1)`` times as
far from the mean of the others, so vad can calibrate thresholds on every training image
(``leave_one_out``) instead of holding some back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option


class FeatureDistance(Detector):
    """Per-patch Euclidean distance to the mean normal feature at the same grid position."""

    name = "feature-distance"
    input = "features"
    leave_one_out = True

    class Options(Detector.Options):
        normalize: bool = option(False, "L2-normalise each patch feature first (compares directions, not magnitudes).")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.mean: torch.Tensor | None = None
        self.count = 0

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        return torch.nn.functional.normalize(features, dim=1) if self.options.normalize else features

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        total, count = None, 0
        for batch in batches:
            batch = self._prepare(batch)
            total = batch.sum(0) if total is None else total + batch.sum(0)
            count += batch.shape[0]
        if total is None:
            raise VadError("feature-distance needs at least one training image")
        self.mean, self.count = total / count, count

    def predict(self, batch: torch.Tensor) -> Prediction:
        if self.mean is None:
            raise VadError("feature-distance: predict called before fit")
        features = self._prepare(batch)
        if features.shape[1:] != self.mean.shape:
            raise VadError(f"feature grid {tuple(features.shape[1:])} differs from the fitted {tuple(self.mean.shape)}")
        maps = (features - self.mean.to(features.device)).norm(dim=1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Training images against the mean of the others: ``|x - mean_without_x| = n/(n-1) |x - mean|``."""
        if self.count < 2:
            raise VadError("feature-distance scores a training image left out only with 2 or more training images")
        prediction, factor = self.predict(batch), self.count / (self.count - 1)
        return Prediction(scores=prediction.scores * factor, maps=prediction.maps * factor)

    def to(self, device):
        super().to(device)
        if self.mean is not None:
            self.mean = self.mean.to(device)
        return self

    def state(self) -> State:
        return State(meta={"count": self.count}, tensors={} if self.mean is None else {"mean": self.mean})

    def load_state(self, state: State) -> None:
        self.mean, self.count = state.tensors["mean"].to(self.device), int(state.meta.get("count", 0))
