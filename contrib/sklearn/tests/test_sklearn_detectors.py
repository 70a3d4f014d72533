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
from vad.options import OptionError
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
    "cls, kwargs, allowed",
    [
        (KNNDetector, {"n_neighbors": 0}, "an integer, >= 1"),
        (KNNDetector, {"pca": 1.5}, "a variance fraction in (0, 1) such as 0.95 or an integer count of components >= 1"),
        (KNNDetector, {"pca": True}, "a variance fraction in (0, 1)"),
        (KNNDetector, {"pca": 0}, "an integer count of components >= 1"),
        (OneClassSVMDetector, {"kernel": "cubic"}, "one of 'rbf', 'linear', 'poly', 'sigmoid'"),
        (OneClassSVMDetector, {"nu": 0}, "a number, > 0 and <= 1"),
        (OneClassSVMDetector, {"gamma": "big"}, "one of 'scale', 'auto' or a number, > 0"),
        (OneClassSVMDetector, {"gamma": -1.0}, "> 0"),
        (OneClassSVMDetector, {"degree": 0}, ">= 1"),
        (IsolationForestDetector, {"max_features": 2.0}, "a number, > 0 and <= 1"),
        (IsolationForestDetector, {"max_samples": "all"}, "one of 'auto' or an integer or a number, an integer count >= 1 or a fraction in (0, 1]"),
        (IsolationForestDetector, {"max_samples": 1.5}, "a fraction in (0, 1]"),
        (IsolationForestDetector, {"n_estimators": 0}, ">= 1"),
        (EllipticDetector, {"support_fraction": 0}, "a number or null, > 0 and <= 1"),
    ],
)
def test_bad_hyper_parameters_name_the_option_the_value_and_what_is_allowed(cls, kwargs, allowed):
    (key, value), = kwargs.items()
    with pytest.raises(OptionError) as caught:
        cls(**kwargs)
    message = str(caught.value)
    assert message.startswith(f"detector {cls.name!r}: option {key}={value!r} is not allowed; {key} must be ")
    assert allowed in message


def test_unknown_options_are_refused_with_a_suggestion():
    with pytest.raises(VadError, match=r"detector 'sklearn-knn' has no option 'n_neighbours' \(did you mean 'n_neighbors'\?\)"):
        KNNDetector(n_neighbours=3)
    with pytest.raises(VadError, match="has no option 'kernel'"):
        IsolationForestDetector(kernel="rbf")


@pytest.mark.parametrize(
    "cls, kwargs, expected",
    [
        (KNNDetector, {"pca": 3.0}, 3),
        (KNNDetector, {"pca": "0.95"}, 0.95),
        (KNNDetector, {"pca": "4"}, 4),
        (OneClassSVMDetector, {"gamma": "0.5"}, 0.5),
        (OneClassSVMDetector, {"gamma": "auto"}, "auto"),
        (IsolationForestDetector, {"max_samples": "64"}, 64),
        (IsolationForestDetector, {"max_samples": 0.5}, 0.5),
        (EllipticDetector, {"support_fraction": 1}, 1.0),
    ],
)
def test_option_values_are_coerced_as_declared(cls, kwargs, expected):
    (key, _), = kwargs.items()
    value = getattr(cls(**kwargs).options, key)
    assert value == expected and type(value) is type(expected)


def test_options_are_declared_once_and_inherited():
    common = ["standardize", "pca", "seed"]
    assert list(KNNDetector.Options.fields()) == common + ["n_neighbors"]
    assert list(OneClassSVMDetector.Options.fields()) == common + ["kernel", "nu", "gamma", "degree", "coef0"]
    assert list(IsolationForestDetector.Options.fields()) == common + ["n_estimators", "max_samples", "max_features"]
    detector = IsolationForestDetector(n_estimators=10, seed=4)
    assert detector.hparams == {
        "standardize": True, "pca": None, "seed": 4, "n_estimators": 10, "max_samples": "auto", "max_features": 1.0
    }
    assert IsolationForestDetector(**detector.hparams).options == detector.options


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
