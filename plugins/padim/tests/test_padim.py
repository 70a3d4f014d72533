"""Tests of vad-padim: Gaussians against NumPy/SciPy, reductions, fit/predict, saving, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from vad.contracts import State
from vad.errors import VadError
from vad.options import OptionError
from vad_padim.detector import PADIM_STATE_VERSION, PaDiM
from vad_padim.gaussian import GaussianAccumulator, mahalanobis_map
from vad_padim.reduction import random_channel_subset


def grids(count: int, seed: int, channels: int = 10, height: int = 3, width: int = 4, batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # correlated channels with position-dependent offsets, so the covariances are not trivial
    mixing = torch.randn(channels, channels, generator=generator)
    offsets = torch.randn(1, channels, height, width, generator=generator) * 3
    return [
        torch.einsum("bchw,cd->bdhw", torch.randn(batch, channels, height, width, generator=generator), mixing) + offsets
        for _ in range(count)
    ]


def direct_maps(train: np.ndarray, test: np.ndarray, eps: float = 0.01) -> np.ndarray:
    """The official computation: np.cov + eps*I per position, scipy's mahalanobis per patch."""
    n, d, h, w = train.shape
    train_flat, test_flat = train.reshape(n, d, h * w), test.reshape(test.shape[0], d, h * w)
    out = np.zeros((test.shape[0], h * w))
    for p in range(h * w):
        mean = train_flat[:, :, p].mean(0)
        inverse = np.linalg.inv(np.cov(train_flat[:, :, p], rowvar=False) + eps * np.identity(d))
        for b in range(test.shape[0]):
            out[b, p] = mahalanobis(test_flat[b, :, p], mean, inverse)
    return out.reshape(test.shape[0], h, w)


# ------------------------------------------------------------------ numerical core


def test_mahalanobis_matches_numpy_and_scipy_per_position():
    train, test = grids(3, seed=0), grids(1, seed=1)[0]
    detector = PaDiM(reduction="none")
    detector.fit(train)
    prediction = detector.predict(test)
    expected = direct_maps(torch.cat(train).double().numpy(), test.double().numpy())
    np.testing.assert_allclose(prediction.maps.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prediction.scores.numpy(), expected.reshape(len(expected), -1).max(1), rtol=1e-4)


def test_random_subset_gaussians_match_direct_computation_on_the_kept_channels():
    train, test = grids(3, seed=2, channels=16), grids(1, seed=3, channels=16)[0]
    detector = PaDiM(dim=6, seed=7)
    detector.fit(train)
    index = random_channel_subset(16, 6, 7)
    assert torch.equal(detector.channel_index, index)
    expected = direct_maps(torch.cat(train)[:, index].double().numpy(), test[:, index].double().numpy())
    np.testing.assert_allclose(detector.predict(test).maps.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_pca_reduction_matches_direct_computation():
    train, test = grids(3, seed=4, channels=12), grids(1, seed=5, channels=12)[0]
    detector = PaDiM(dim=5, reduction="pca")
    assert detector.training_passes == 2
    detector.fit(train)
    stacked = torch.cat(train).double().numpy()
    rows = stacked.transpose(0, 2, 3, 1).reshape(-1, 12)
    values, vectors = np.linalg.eigh(np.cov(rows, rowvar=False))
    axes = vectors[:, ::-1][:, :5]
    project = lambda x: np.einsum("bchw,cd->bdhw", x - rows.mean(0)[None, :, None, None], axes)  # noqa: E731
    expected = direct_maps(project(stacked), project(test.double().numpy()))
    np.testing.assert_allclose(detector.predict(test).maps.numpy(), expected, rtol=1e-3, atol=1e-3)


def test_streaming_fit_does_not_depend_on_batching():
    train = grids(4, seed=6)
    whole = PaDiM(reduction="none")
    whole.fit([torch.cat(train)])
    streamed = PaDiM(reduction="none")
    streamed.fit(train)
    torch.testing.assert_close(whole.mean, streamed.mean)
    torch.testing.assert_close(whole.inverse_covariance, streamed.inverse_covariance, rtol=1e-5, atol=1e-6)


def test_accumulator_counts_and_mahalanobis_of_the_mean_is_zero():
    accumulator = GaussianAccumulator(positions=2, dim=3)
    accumulator.update(torch.randn(5, 3, 1, 2))
    accumulator.update(torch.randn(2, 3, 1, 2))
    assert accumulator.count == 7
    mean, inverse = accumulator.finish(0.01)
    at_mean = mean.T.reshape(1, 3, 1, 2)
    assert torch.allclose(mahalanobis_map(at_mean, mean, inverse), torch.zeros(1, 1, 2), atol=1e-3)


def test_random_subset_is_seeded_and_distinct():
    a, b = random_channel_subset(448, 100, 3), random_channel_subset(448, 100, 3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 100 and int(a.max()) < 448
    assert not torch.equal(a, random_channel_subset(448, 100, 4))


# ------------------------------------------------------------------ with a feature source


def test_fit_predict_on_fake_backbone_features(fake_backbone, tiny_dataset):
    from vad.features import PatchFeatures
    from vad.preprocess import to_batch

    source = PatchFeatures(fake_backbone, layers=["stage1", "stage2", "stage3"], aggregation=1)
    train = [to_batch([s.load_image() for s in tiny_dataset.train[i : i + 4]], source.preprocessing) for i in (0, 4)]
    detector = PaDiM(dim=20)
    detector.fit([source(batch) for batch in train])
    test = to_batch([s.load_image() for s in tiny_dataset.test], source.preprocessing)
    prediction = detector.predict(source(test))
    labels = np.array([s.label for s in tiny_dataset.test])
    assert prediction.maps.shape == (len(labels), 16, 16) and prediction.scores.shape == (len(labels),)
    assert torch.isfinite(prediction.maps).all()
    scores = prediction.scores.numpy()
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_dim_above_the_source_channels_keeps_them_all():
    detector = PaDiM(dim=100)
    detector.fit(grids(2, seed=8, channels=10))
    assert detector.mean.shape == (12, 10)


# ------------------------------------------------------------------ state and devices


@pytest.mark.parametrize("reduction", ["pca", "none"])  # the conformance kit checks the default
def test_save_load_roundtrip_gives_equal_scores(reduction):
    train, test = grids(3, seed=9, channels=14), grids(1, seed=10, channels=14)[0]
    detector = PaDiM(dim=6, reduction=reduction, seed=2)
    detector.fit(train)
    state = detector.state()
    assert state.meta["padim_state_version"] == PADIM_STATE_VERSION
    assert all(t.device.type == "cpu" for t in state.tensors.values())
    restored = PaDiM(**detector.hparams)
    restored.load_state(State(dict(state.meta), dict(state.tensors)))
    before, after = detector.predict(test), restored.predict(test)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)


def test_device_placement_cpu():
    detector = PaDiM(dim=4).to("cpu")
    detector.fit(grids(2, seed=11))
    assert detector.mean.device.type == "cpu" and detector.inverse_covariance.device.type == "cpu"
    prediction = detector.predict(grids(1, seed=12)[0])
    assert prediction.scores.device.type == "cpu" and prediction.maps.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_placement_cuda_matches_cpu():
    train, test = grids(2, seed=13), grids(1, seed=14)[0]
    cpu = PaDiM(dim=4)
    cpu.fit(train)
    cuda = PaDiM(dim=4).to("cuda")
    cuda.fit([g.cuda() for g in train])
    prediction = cuda.predict(test.cuda())
    assert prediction.maps.device.type == "cuda"
    torch.testing.assert_close(prediction.maps.cpu(), cpu.predict(test).maps, rtol=1e-3, atol=1e-3)


def test_export_head_matches_predict():
    train, test = grids(2, seed=15, channels=12), grids(1, seed=16, channels=12)[0]
    for reduction in ("random", "pca"):
        detector = PaDiM(dim=5, reduction=reduction)
        detector.fit(train)
        scores, maps = detector.export_module()(test)
        prediction = detector.predict(test)
        torch.testing.assert_close(maps, prediction.maps)
        torch.testing.assert_close(scores, prediction.scores)


# ------------------------------------------------------------------ errors


def test_empty_training_set_is_refused_and_leaves_the_detector_unfitted():
    for reduction in ("random", "pca"):
        detector = PaDiM(reduction=reduction)
        with pytest.raises(VadError, match="empty training set"):
            detector.fit([])
        assert not detector.fitted


def test_one_training_image_is_refused():
    with pytest.raises(VadError, match="at least 2"):
        PaDiM(dim=4).fit([torch.randn(1, 8, 2, 2)])


def test_memory_budget_refuses_before_allocating_and_suggests_a_dim():
    detector = PaDiM(dim=100, max_covariance_gb=0.001)  # 1 MB
    with pytest.raises(VadError, match=r"dim <= 31\b") as error:
        detector.fit([torch.randn(2, 200, 16, 16)])  # 256 positions x 100^2 x 4 B = 10.2 MB
    assert "0.01 GB" in str(error.value)
    assert not detector.fitted
    PaDiM(dim=31, max_covariance_gb=0.001).fit([torch.randn(2, 200, 16, 16)])  # the suggestion fits


def test_predict_errors():
    detector = PaDiM(dim=4)
    with pytest.raises(VadError, match="not fitted"):
        detector.predict(torch.randn(1, 10, 3, 4))
    with pytest.raises(VadError, match="not fitted"):
        detector.state()
    detector.fit(grids(2, seed=17))
    with pytest.raises(VadError, match="same feature source"):
        detector.predict(torch.randn(1, 10, 5, 5))
    with pytest.raises(VadError, match="feature grids"):
        detector.predict(torch.randn(10, 3, 4))
    with pytest.raises(VadError, match="changed"):
        PaDiM(dim=4).fit([torch.randn(2, 10, 3, 4), torch.randn(2, 10, 4, 4)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 0}, "option dim=0 is not allowed; dim must be an integer, >= 1"),
        ({"dim": 2.5}, "option dim=2.5 is not allowed; dim must be an integer, >= 1"),
        ({"reduction": "svd"}, "option reduction='svd' is not allowed; reduction must be one of 'random', 'pca', 'none'"),
        ({"eps": 0}, "option eps=0 is not allowed; eps must be a number, > 0"),
        ({"max_covariance_gb": -1}, "option max_covariance_gb=-1 is not allowed; max_covariance_gb must be a number, > 0"),
    ],
)
def test_bad_hyper_parameters(kwargs, message):
    with pytest.raises(OptionError) as error:
        PaDiM(**kwargs)
    assert str(error.value) == f"detector 'padim': {message}"


def test_unknown_option_names_the_close_one():
    with pytest.raises(VadError, match=r"detector 'padim' has no option 'dims' \(did you mean 'dim'\?\); its options are: dim, reduction"):
        PaDiM(dims=10)


def test_options_are_coerced_and_saved_as_hparams():
    detector = PaDiM(dim="12", reduction="pca", eps="1e-3", seed=3)
    assert detector.options.dim == 12 and detector.options.eps == 0.001
    assert detector.training_passes == 2 and PaDiM().training_passes == 1
    assert detector.hparams == {"dim": 12, "reduction": "pca", "eps": 0.001, "max_covariance_gb": 4.0, "seed": 3}
    assert PaDiM(**detector.hparams).options == detector.options


def test_load_state_refuses_other_versions_and_damaged_tensors():
    detector = PaDiM(dim=4)
    detector.fit(grids(2, seed=18))
    state = detector.state()
    with pytest.raises(VadError, match="padim_state_version"):
        PaDiM(dim=4).load_state(State({**state.meta, "padim_state_version": 99}, state.tensors))
    damaged = dict(state.tensors, mean=state.tensors["mean"][:3])
    fresh = PaDiM(dim=4)
    with pytest.raises(VadError, match="damaged"):
        fresh.load_state(State(state.meta, damaged))
    assert not fresh.fitted


@pytest.mark.parametrize("reduction", ["pca"])  # the conformance kit checks the default
def test_onnx_export_matches_torch(tmp_path, reduction, fake_backbone, tiny_dataset):
    pytest.importorskip("onnxruntime")
    from vad.export import check_parity, export_onnx
    from vad.features import PatchFeatures
    from vad.model import AnomalyModel, Member

    source = PatchFeatures(fake_backbone, layers=["stage1", "stage2"], aggregation=1)
    model = AnomalyModel([Member("padim", PaDiM(dim=12, reduction=reduction), source)], batch_size=4)
    model.fit(tiny_dataset.train, [])
    export_onnx(model, tmp_path / "padim.onnx")
    images = [s.load_image() for s in tiny_dataset.test[:3]]
    assert check_parity(model, tmp_path / "padim.onnx", images) < 1e-3


def test_left_out_distances_equal_a_refit_without_the_image():
    train = grids(1, seed=30, channels=5, batch=7)[0]  # 7 images, 5 channels, one 2x3 grid
    detector = PaDiM(dim=5, reduction="none", eps=0.01)
    detector.fit([train])
    left_out = detector.predict_left_out(train, torch.arange(7))
    count = 7
    for image in range(count):
        others = torch.cat([train[:image], train[image + 1 :]])
        # the closed form scales the regulariser with the covariance: eps (n - 1) / (n - 2)
        refit = PaDiM(dim=5, reduction="none", eps=0.01 * (count - 1) / (count - 2))
        refit.fit([others])
        expected = refit.predict(train[image : image + 1])
        torch.testing.assert_close(left_out.maps[image : image + 1], expected.maps, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(left_out.scores[image : image + 1], expected.scores, rtol=1e-4, atol=1e-4)
    assert (left_out.maps > detector.predict(train).maps).all()  # held out, every point looks farther
