"""Ensembles inside a whole vad model: fit on train, calibrate on validation, save, load, predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vad import hookimpl
from vad.build import create_backbone
from vad.contracts import Detector, Prediction, State
from vad.features import PatchFeatures
from vad.model import AnomalyModel, Member


class MeanDistance(Detector):
    """Distance of every patch to the mean training patch at its grid position: a minimal
    feature head for tests (the tiny data's parts are aligned)."""

    name = "mean-distance"

    def __init__(self) -> None:
        super().__init__()
        self.mean: torch.Tensor | None = None

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, batches):
        total, count = 0.0, 0
        for features in batches:
            total = total + features.sum(dim=0)
            count += features.shape[0]
        self.mean = total / count

    def predict(self, batch):
        maps = (batch - self.mean.to(batch)[None]).square().sum(1).sqrt()
        return Prediction(maps.amax(dim=(1, 2)), maps)

    def state(self):
        return State(tensors={"mean": self.mean})

    def load_state(self, state):
        self.mean = state.tensors["mean"]


class MeanDistancePlugin:
    @hookimpl
    def vad_register_detectors(self, register):
        register(MeanDistance)


def auroc(scores, labels) -> float:
    scores, labels = np.asarray(scores), np.asarray(labels)
    positive, negative = scores[labels == 1], scores[labels == 0]
    return float((positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean())


def members(registry):
    return [
        PatchFeatures(create_backbone("fake-backbone", registry, seed=0, size=64)),
        PatchFeatures(create_backbone("fake-backbone", registry, seed=1, size=96)),
    ]


def round_trip(model, registry, tmp_path, test):
    before = [output.score for output in model.predict(test)]
    maps_before = [output.map for output in model.predict(test[:2])]
    model.save(tmp_path / "model", registry=registry)
    loaded = AnomalyModel.load(tmp_path / "model", registry=registry)
    after = [output.score for output in loaded.predict(test)]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    for a, b in zip([o.map for o in loaded.predict(test[:2])], maps_before):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return before


def test_pca_global_model_fits_saves_loads_and_detects(vad_fakes, register_plugin, tiny_dataset, tmp_path):
    with register_plugin(MeanDistancePlugin(), name="mean-distance-plugin") as registry:
        source = registry.load_class("ensemblers", "pca-global")(members(registry), n_components=12)
        model = AnomalyModel([Member("mean-distance", MeanDistance(), source)], batch_size=4)
        model.fit(tiny_dataset.train, tiny_dataset.validation)
        scores = round_trip(model, registry, tmp_path, tiny_dataset.test)
        assert auroc(scores, [s.label for s in tiny_dataset.test]) > 0.8


def test_score_mean_model_fits_saves_and_loads(vad_fakes, register_plugin, tiny_dataset, tmp_path):
    with register_plugin(MeanDistancePlugin(), name="mean-distance-plugin") as registry:
        model = AnomalyModel(
            [Member("mean-distance", MeanDistance(), source) for source in members(registry)],
            ensembler=registry.load_class("ensemblers", "score-mean")(),
            ensembler_name="score-mean",
            batch_size=4,
        )
        model.fit(tiny_dataset.train, tiny_dataset.validation)
        round_trip(model, registry, tmp_path, tiny_dataset.test)


@pytest.mark.parametrize("name, calibration", [("learned-weights", "cross-fit"), ("stacker", "hold-out")])
def test_a_model_learns_from_synthetic_anomalies_of_its_calibration_images(vad_fakes, register_plugin, tiny_dataset, tmp_path, name, calibration):
    with register_plugin(MeanDistancePlugin(), name="mean-distance-plugin") as registry:
        model = AnomalyModel(
            [Member("mean-distance", MeanDistance(), source) for source in members(registry)],
            ensembler=registry.load_class("ensemblers", name)(anomalies=["cutout"]),
            ensembler_name=name,
            batch_size=4,
            calibration_method=calibration,
        )
        model.fit(tiny_dataset.train)
        assert model.calibration["method"] == calibration
        assert model.calibration["synthetic_anomalies"] == model.calibration["scores"]  # cutout always changes the image
        assert model.ensembler.weights is not None
        round_trip(model, registry, tmp_path, tiny_dataset.test)


class LeftOutRecorder(MeanDistance):
    """MeanDistance that says it scores training images as left out, and records the positions."""

    name = "left-out-recorder"
    leave_one_out = True

    def __init__(self) -> None:
        super().__init__()
        self.left_out: list[list[int]] = []

    def predict_left_out(self, batch, indices):
        self.left_out.append(indices.tolist())
        return self.predict(batch)


def test_synthetic_anomalies_are_scored_left_out_as_the_images_they_were_made_from(vad_fakes, register_plugin, tiny_dataset):
    with register_plugin(MeanDistancePlugin(), name="mean-distance-plugin") as registry:
        recorders = [LeftOutRecorder(), LeftOutRecorder()]
        model = AnomalyModel(
            [Member("left-out-recorder", recorder, source) for recorder, source in zip(recorders, members(registry))],
            ensembler=registry.load_class("ensemblers", "learned-weights")(anomalies=["cutout"]),
            ensembler_name="learned-weights",
            batch_size=4,
        )
        model.fit(tiny_dataset.train)
    assert model.calibration["method"] == "leave-one-out"
    count = len(tiny_dataset.train)
    for recorder in recorders:
        # Per batch: the normals' positions, then the same positions for their synthetic anomalies.
        assert recorder.left_out[0::2] == recorder.left_out[1::2]
        assert sorted(i for batch in recorder.left_out[0::2] for i in batch) == list(range(count))
