"""A small but real detector: distance of each patch to the mean normal patch at its position.

It is PaDiM with an identity covariance: fit averages the training feature grids position by
position (streaming, one grid in memory); predict returns the Euclidean distance map and its
maximum as the image score.
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

    class Options(Detector.Options):
        normalize: bool = option(False, "L2-normalise each patch feature first (compares directions, not magnitudes).")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.mean: torch.Tensor | None = None

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
        self.mean = total / count

    def predict(self, batch: torch.Tensor) -> Prediction:
        if self.mean is None:
            raise VadError("feature-distance: predict called before fit")
        features = self._prepare(batch)
        if features.shape[1:] != self.mean.shape:
            raise VadError(f"feature grid {tuple(features.shape[1:])} differs from the fitted {tuple(self.mean.shape)}")
        maps = (features - self.mean.to(features.device)).norm(dim=1)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def to(self, device):
        super().to(device)
        if self.mean is not None:
            self.mean = self.mean.to(device)
        return self

    def state(self) -> State:
        return State(meta={}, tensors={} if self.mean is None else {"mean": self.mean})

    def load_state(self, state: State) -> None:
        self.mean = state.tensors["mean"].to(self.device)
