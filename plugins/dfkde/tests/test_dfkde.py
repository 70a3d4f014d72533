"""DFKDE: the KDE and Scott's bandwidth against SciPy, the whole score by hand, subsets, the
contract, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from vad.contracts import State
from vad.errors import VadError
from vad.options import OptionError
from vad.testing import check_detector
from vad_dfkde.detector import DFKDE, DFKDE_STATE_VERSION
from vad_dfkde.kde import GaussianKDE, scott_factor


def grids(count: int, seed: int, channels: int = 8, size: int = 3) -> torch.Tensor:
    """Feature grids ``[count, channels, size, size]`` whose channel means vary between images."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=generator)
    per_image = torch.randn(count, channels, 1, 1, generator=generator)
    return torch.einsum("bchw,cd->bdhw", per_image + 0.3 * torch.randn(count, channels, size, size, generator=generator), mixing) + 1.0


def by_hand(train: torch.Tensor, test: torch.Tensor, components: int, method: str) -> np.ndarray:
    """anomalib's DFKDE in NumPy/SciPy: global means, PCA, scaling, scipy's KDE; the log-density of ``test``."""
    x_train, x_test = (g.double().mean((2, 3)).numpy() for g in (train, test))
    mean = x_train.mean(0)
    axes = np.linalg.svd(x_train - mean, full_matrices=False)[2][:components].T
    z_train, z_test = (x_train - mean) @ axes, (x_test - mean) @ axes
    if method == "scale":
        longest = np.linalg.norm(z_train, axis=1).max()
        z_train, z_test = z_train / longest, z_test / longest
    else:
        z_train = z_train / np.linalg.norm(z_train, axis=1, keepdims=True)
        z_test = z_test / np.linalg.norm(z_test, axis=1, keepdims=True)
    return gaussian_kde(z_train.T, bw_method="scott").logpdf(z_test.T)


@pytest.fixture(scope="module")
def fitted() -> DFKDE:
    detector = DFKDE(n_pca_components=3)
    train = grids(16, seed=0)
    detector.fit([train[:10], train[10:]])
    return detector


# ------------------------------------------------------------------ the KDE and its bandwidth


def test_kde_and_scotts_bandwidth_match_scipy():
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(30, 3, generator=generator, dtype=torch.float64) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, -0.3, 0.2]], dtype=torch.float64) + 4
    reference = gaussian_kde(points.numpy().T)
    assert scott_factor(30, 3) == pytest.approx(reference.factor) == pytest.approx(30 ** (-1 / 7))
    kde = GaussianKDE.fit(points)
    bandwidth = torch.linalg.inv(kde.whitening.double() @ kde.whitening.double().T)  # H = (W W^T)^-1
    np.testing.assert_allclose(bandwidth.numpy(), reference.covariance, rtol=1e-5, atol=1e-6)
    far = torch.tensor([[40.0, -30, 25]], dtype=torch.float64)  # every kernel underflows in float32 there
    queries = torch.cat([points[:3] + 0.1, torch.randn(4, 3, generator=generator, dtype=torch.float64) * 2 + 4, far])
    np.testing.assert_allclose(kde.log_density(queries.float()).double().numpy(), reference.logpdf(queries.numpy().T), rtol=1e-4)
    brute = torch.tensor(reference.pdf(queries[:7].numpy().T)).log()  # the plain mean of normalised kernels
    torch.testing.assert_close(kde.log_density(queries[:7].float()).double(), brute, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the detector's score


@pytest.mark.parametrize("method", ["scale", "norm"])
def test_scores_are_the_negative_log_density_of_anomalibs_pipeline(method):
    train, test = grids(16, seed=0), grids(5, seed=2)
    detector = DFKDE(n_pca_components=3, feature_scaling_method=method)
    detector.fit([train])
    expected = by_hand(train, test, 3, method)
    np.testing.assert_allclose(detector.predict(test).scores.numpy(), -expected, rtol=1e-4, atol=1e-4)
    logistic = DFKDE(n_pca_components=3, feature_scaling_method=method, score="logistic")
    logistic.fit([train])
    probability = 1 / (1 + np.exp(0.05 * (expected - 12)))  # anomalib's compute_probabilities
    np.testing.assert_allclose(logistic.predict(test).scores.numpy(), probability, rtol=1e-5)


def test_training_points_beyond_the_maximum_are_a_seeded_subset():
    train, test = grids(20, seed=3), grids(4, seed=4)
    detector = DFKDE(n_pca_components=3, max_training_points=12, seed=5)
    detector.fit([train[:7], train[7:]])
    assert detector.kde.points.shape == (12, 3) and detector.train_images == 20
    chosen = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:12]
    np.testing.assert_allclose(detector.predict(test).scores.numpy(), -by_hand(train[chosen], test, 3, "scale"), rtol=1e-4, atol=1e-4)


def test_far_images_keep_finite_ordered_scores(fitted):
    base = grids(1, seed=6)
    scores = fitted.predict(torch.cat([base, base * 30, base * 300])).scores
    assert torch.isfinite(scores).all() and scores[0] < scores[1] < scores[2]  # anomalib: log 0 = -inf, all tied


# ------------------------------------------------------------------ the contract, state and bad input


def test_keeps_the_contract_with_onnx_parity():
    run = check_detector(DFKDE)  # fake stage2 + stage3 channels, globally pooled; scores only
    assert run.maps is None and run.onnx.startswith(("parity", "skipped"))


def test_state_round_trip_and_refusals(fitted):
    test = grids(3, seed=7)
    state = fitted.state()
    assert state.meta["dfkde_state_version"] == DFKDE_STATE_VERSION and state.meta["kde_points"] == 16
    restored = DFKDE(**fitted.hparams)
    restored.load_state(State(dict(state.meta), dict(state.tensors)))
    assert torch.equal(restored.predict(test).scores, fitted.predict(test).scores)
    with pytest.raises(VadError, match="feature_scaling_method"):
        DFKDE(n_pca_components=3, feature_scaling_method="norm").load_state(state)
    with pytest.raises(VadError, match="n_pca_components=4"):
        DFKDE(n_pca_components=4).load_state(state)
    fresh = DFKDE(n_pca_components=3)
    with pytest.raises(VadError, match="max_length"):
        fresh.load_state(State(state.meta, {k: v for k, v in state.tensors.items() if k != "max_length"}))
    with pytest.raises(VadError, match="dfkde_state_version"):
        fresh.load_state(State({**state.meta, "dfkde_state_version": 0}, state.tensors))
    assert not fresh.fitted


def test_bad_input_is_a_clear_error_and_changes_nothing(fitted):
    with pytest.raises(VadError, match="not fitted"):
        DFKDE().predict(grids(1, seed=8))
    with pytest.raises(VadError, match="empty training set"):
        DFKDE().fit([])
    with pytest.raises(VadError, match=r"feature grids \[B, C, h, w\]"):
        fitted.predict(grids(1, seed=8)[0])
    with pytest.raises(VadError, match="8-channel"):
        fitted.predict(grids(1, seed=8, channels=5))
    before = fitted.predict(grids(2, seed=9)).scores
    with pytest.raises(VadError, match="more training images than n_pca_components=3"):
        fitted.fit([grids(3, seed=10)])
    with pytest.raises(VadError, match="do not vary"):
        fitted.fit([torch.ones(6, 8, 3, 3)])
    assert torch.equal(fitted.predict(grids(2, seed=9)).scores, before)


@pytest.mark.parametrize("options", [{"n_pca_components": 0}, {"feature_scaling_method": "none"}, {"max_training_points": 1}, {"score": "probability"}])
def test_bad_options_are_clear_errors(options):
    with pytest.raises(OptionError):
        DFKDE(**options)


def test_defaults_are_anomalibs():
    options = DFKDE().options
    assert (options.n_pca_components, options.feature_scaling_method, options.max_training_points) == (16, "scale", 40000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(fitted):
    train, test = grids(16, seed=0), grids(3, seed=12)
    cuda = DFKDE(n_pca_components=3).to("cuda")
    cuda.fit([train[:10].cuda(), train[10:].cuda()])
    prediction = cuda.predict(test.cuda())
    assert prediction.scores.device.type == "cuda" and cuda.state().tensors["kde.points"].device.type == "cpu"
    torch.testing.assert_close(prediction.scores.cpu(), fitted.predict(test).scores, rtol=1e-3, atol=1e-3)
    moved = DFKDE(**fitted.hparams)
    moved.load_state(fitted.state())
    torch.testing.assert_close(moved.to("cuda").predict(test.cuda()).scores.cpu(), fitted.predict(test).scores, rtol=1e-3, atol=1e-3)
