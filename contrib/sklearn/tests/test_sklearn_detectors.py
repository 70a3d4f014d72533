"""Tests of vad-sklearn: scores against scikit-learn's score_samples, saving, devices, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EllipticEnvelope
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

from vad.contracts import State
from vad.errors import VadError
from vad_sklearn.detectors import (
    SKLEARN_STATE_VERSION,
    EllipticDetector,
    IsolationForestDetector,
    KNNDetector,
    LOFDetector,
    OneClassSVMDetector,
)


def grids(images: int, seed: int, channels: int = 6, batch: int = 10, shift: float = 0.0) -> list[torch.Tensor]:
    """Feature grids [B, C, 4, 4] whose pooled vectors are correlated Gaussians (+ shift)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=torch.Generator().manual_seed(99))
    out = []
    for start in range(0, images, batch):
        size = min(batch, images - start)
        pooled = torch.randn(size, channels, generator=generator) @ mixing + shift
        noise = torch.randn(size, channels, 4, 4, generator=generator) * 0.1
        out.append(pooled[:, :, None, None] + noise - noise.mean(dim=(2, 3), keepdim=True))
    return out


def pooled(batches: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(batches).double().mean(dim=(2, 3)).numpy()


def reference_scores(name: str, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``-score_samples`` (or the kNN mean distance) of the scikit-learn estimator itself."""
    if name == "knn":
        return NearestNeighbors(n_neighbors=5).fit(train).kneighbors(test)[0].mean(1)
    estimator = {
        "lof": LocalOutlierFactor(n_neighbors=20, novelty=True),
        "elliptic": EllipticEnvelope(random_state=0),
        "ocsvm": OneClassSVM(gamma="scale"),
        "iforest": IsolationForest(random_state=0),
    }[name]
    return -estimator.fit(train).score_samples(test)


CLASSES = {
    "knn": KNNDetector,
    "lof": LOFDetector,
    "elliptic": EllipticDetector,
    "ocsvm": OneClassSVMDetector,
    "iforest": IsolationForestDetector,
}


@pytest.fixture(scope="module")
def data():
    train = grids(40, seed=0)
    test = grids(10, seed=1) + grids(10, seed=2, shift=2.0)
    return train, test


# ------------------------------------------------------------------ against scikit-learn


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_scores_equal_negated_score_samples_and_are_ordered_alike(name, data):
    train, test = data
    detector = CLASSES[name](standardize=False)
    detector.fit(train)
    ours = torch.cat([detector.predict(batch).scores for batch in test]).double().numpy()
    expected = reference_scores(name, pooled(train), pooled(test))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert (np.argsort(ours, kind="stable") == np.argsort(expected, kind="stable")).all()
    exact = detector.score_vectors(torch.from_numpy(pooled(test)))
    np.testing.assert_allclose(exact.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pca", [0.95, 3])
def test_standardize_and_pca_equal_the_scikit_learn_pipeline(pca, data):
    train, test = data
    detector = OneClassSVMDetector(standardize=True, pca=pca)
    detector.fit(train)
    pipeline = make_pipeline(StandardScaler(), PCA(n_components=pca, svd_solver="full"), OneClassSVM(gamma="scale"))
    expected = -pipeline.fit(pooled(train)).score_samples(pooled(test))
    ours = torch.cat([detector.predict(batch).scores for batch in test]).double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_shifted_images_score_higher_and_no_maps(name, data):
    train, test = data
    detector = CLASSES[name]()
    detector.fit(train)
    predictions = [detector.predict(batch) for batch in test]
    assert all(p.maps is None for p in predictions) and type(detector).produces_maps is False
    assert predictions[1].scores.mean() > predictions[0].scores.mean()


# ------------------------------------------------------------------ state and devices


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_save_load_roundtrip_gives_equal_scores(name, data):
    train, test = data
    detector = CLASSES[name](pca=0.95, seed=3)
    detector.fit(train)
    state = detector.state()
    assert state.meta["sklearn_state_version"] == SKLEARN_STATE_VERSION
    assert all(t.device.type == "cpu" and t.dtype in (torch.float64, torch.int64) for t in state.tensors.values())
    restored = CLASSES[name](**detector.hparams)
    restored.load_state(State(dict(state.meta), dict(state.tensors)))
    for batch in test:
        assert torch.equal(detector.predict(batch).scores, restored.predict(batch).scores)


def test_model_folder_roundtrip_and_image_only(tmp_path, vad_fakes, fake_backbone, tiny_dataset):
    from vad.features import PatchFeatures
    from vad.model import AnomalyModel, Member

    fake_backbone.spec = "fake-backbone"  # as vad.model.create_backbone sets it
    source = PatchFeatures(fake_backbone, layers=["stage2", "stage3"])
    model = AnomalyModel([Member("sklearn-lof", LOFDetector(n_neighbors=3), source)], batch_size=4)
    assert not model.produces_maps
    model.fit(tiny_dataset.train, [])
    model.save(tmp_path / "model", registry=vad_fakes)
    loaded = AnomalyModel.load(tmp_path / "model", registry=vad_fakes)
    first = list(model.predict(tiny_dataset.test))
    second = list(loaded.predict(tiny_dataset.test))
    assert [o.score for o in first] == [o.score for o in second]
    assert all(o.map is None for o in first)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_device_placement_cpu(name, data):
    train, test = data
    detector = CLASSES[name]().to("cpu")
    detector.fit(train)
    assert all(t.device.type == "cpu" for t in detector.params.values())
    assert detector.predict(test[0]).scores.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_device_placement_cuda_matches_cpu(name, data):
    train, test = data
    cpu = CLASSES[name]()
    cpu.fit(train)
    cuda = CLASSES[name]().to("cuda")
    cuda.fit([g.cuda() for g in train])
    scores = cuda.predict(test[0].cuda()).scores
    assert scores.device.type == "cuda"
    torch.testing.assert_close(scores.cpu(), cpu.predict(test[0]).scores, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_empty_training_set_is_refused_and_leaves_the_detector_unfitted(name):
    detector = CLASSES[name]()
    with pytest.raises(VadError, match="empty training set"):
        detector.fit([])
    assert not detector.fitted
    with pytest.raises(VadError, match="not fitted"):
        detector.predict(torch.randn(2, 6, 4, 4))
    with pytest.raises(VadError, match="not fitted"):
        detector.state()


def test_too_few_images_and_shape_errors(data):
    with pytest.raises(VadError, match="at least 2"):
        LOFDetector().fit([torch.randn(1, 6, 4, 4)])
    detector = KNNDetector()
    detector.fit(data[0])
    with pytest.raises(VadError, match="same feature source"):
        detector.predict(torch.randn(2, 7, 4, 4))
    with pytest.raises(VadError, match="feature grids"):
        detector.predict(torch.randn(2, 6))
    with pytest.raises(VadError, match="changed channels"):
        KNNDetector().fit([torch.randn(2, 6, 4, 4), torch.randn(2, 5, 4, 4)])


def test_elliptic_with_more_dimensions_than_images_suggests_pca():
    detector = EllipticDetector()
    with pytest.raises(VadError, match="pca=0.95"):
        detector.fit(grids(5, seed=4, channels=8))
    assert not detector.fitted
    with pytest.raises(VadError, match="at most 5"):
        OneClassSVMDetector(pca=6).fit(grids(5, seed=4, channels=8))


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (KNNDetector, {"n_neighbors": 0}, "n_neighbors"),
        (KNNDetector, {"pca": 1.5}, "pca"),
        (KNNDetector, {"pca": True}, "pca"),
        (OneClassSVMDetector, {"kernel": "cubic"}, "kernel"),
        (OneClassSVMDetector, {"nu": 0}, "nu"),
        (OneClassSVMDetector, {"gamma": "big"}, "gamma"),
        (IsolationForestDetector, {"max_features": 2.0}, "max_features"),
        (IsolationForestDetector, {"max_samples": "all"}, "max_samples"),
        (EllipticDetector, {"support_fraction": 0}, "support_fraction"),
    ],
)
def test_bad_hyper_parameters(cls, kwargs, message):
    with pytest.raises(VadError, match=message):
        cls(**kwargs)


def test_load_state_refuses_other_versions_and_missing_tensors(data):
    detector = LOFDetector()
    detector.fit(data[0])
    state = detector.state()
    with pytest.raises(VadError, match="sklearn_state_version"):
        LOFDetector().load_state(State({**state.meta, "sklearn_state_version": 7}, state.tensors))
    fresh = LOFDetector()
    tensors = {k: v for k, v in state.tensors.items() if k != "estimator_lrd"}
    with pytest.raises(VadError, match="lrd"):
        fresh.load_state(State(dict(state.meta), tensors))
    assert not fresh.fitted
