"""DFM: the PCA's variance rule, FRE and NLL against NumPy/SciPy, the contract, `vad run`, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.options import OptionError
from vad.testing import check_detector
from vad_dfm.detector import DFM, DFM_STATE_VERSION
from vad_dfm.pca import PCA


def grids(count: int, seed: int, channels: int = 3, size: int = 5) -> torch.Tensor:
    """Correlated feature grids ``[count, channels, size, size]`` with an offset (features are not centred)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=generator)
    return torch.einsum("bchw,cd->bdhw", torch.randn(count, channels, size, size, generator=generator), mixing) + 2.0


def numpy_vectors(features: torch.Tensor, kernel: int) -> np.ndarray:
    """2x2 average pooling without partial windows, then C-major flattening, by hand."""
    x = features.double().numpy()
    b, c, h, w = x.shape
    h2, w2 = h // kernel, w // kernel
    pooled = x[:, :, : h2 * kernel, : w2 * kernel].reshape(b, c, h2, kernel, w2, kernel).mean((3, 5))
    return pooled.reshape(b, -1)


@pytest.fixture(scope="module")
def fitted() -> tuple[DFM, torch.Tensor]:
    train = grids(10, seed=0)
    detector = DFM(pooling_kernel_size=2, pca_components=3)
    detector.fit([train[:6], train[6:]])
    return detector, train


# ------------------------------------------------------------------ numerical core


def test_variance_level_keeps_the_fewest_components_that_reach_it():
    # orthogonal zero-mean columns (Hadamard) with variances 5, 3, 2: shares 0.5, 0.3, 0.2
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    vectors = hadamard[:, 1:] * torch.tensor([5.0, 3.0, 2.0]).sqrt() + 7.0
    kept = {level: PCA.fit(vectors, level=level).count for level in (0.3, 0.5, 0.51, 0.8, 0.81, 0.97, 1.0)}
    assert kept == {0.3: 1, 0.5: 1, 0.51: 2, 0.8: 2, 0.81: 3, 0.97: 3, 1.0: 3}  # anomalib keeps one fewer
    pca = PCA.fit(vectors, level=0.81)
    torch.testing.assert_close(pca.variances, torch.tensor([5.0, 3.0, 2.0]))  # S^2 / N: the MLE variances
    torch.testing.assert_close(pca.mean, torch.full((3,), 7.0))
    torch.testing.assert_close(pca.components.abs(), torch.eye(3))
    # 4 images in 10 dimensions span at most 3 directions: a level stops there, a count is refused
    wide = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    assert PCA.fit(wide, level=1.0).count == 3
    with pytest.raises(VadError, match="span only 3 directions"):
        PCA.fit(wide, components=4)


def test_fre_scores_and_maps_match_numpy(fitted):
    detector, train = fitted
    test = grids(4, seed=1)
    x_train, x_test = numpy_vectors(train, 2), numpy_vectors(test, 2)  # 5x5 grids: the last row and column dropped
    mean = x_train.mean(0)
    axes = np.linalg.svd(x_train - mean, full_matrices=False)[2][:3].T
    residual = (x_test - mean) - (x_test - mean) @ axes @ axes.T
    expected_maps = (residual.reshape(4, 3, 2, 2) ** 2).sum(1)
    prediction = detector.predict(test)
    np.testing.assert_allclose(prediction.maps.numpy(), expected_maps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prediction.scores.numpy(), (residual**2).sum(1), rtol=1e-4)
    head_scores, head_maps = detector.export_module()(test)
    torch.testing.assert_close(head_scores, prediction.scores)
    torch.testing.assert_close(head_maps, prediction.maps)


def test_nll_is_the_gaussian_of_the_centred_pca_coordinates():
    train, test = grids(12, seed=2), grids(3, seed=3)
    detector = DFM(pooling_kernel_size=2, pca_level=0.9, score_type="nll")
    detector.fit([train])
    assert not detector.produces_maps and DFM().produces_maps
    x_train, x_test = numpy_vectors(train, 2), numpy_vectors(test, 2)
    mean = x_train.mean(0)
    _, singular, right = np.linalg.svd(x_train - mean, full_matrices=False)
    keep = int(np.searchsorted(np.cumsum(singular**2) / np.sum(singular**2), 0.9) + 1)
    assert detector.pca.count == keep
    coordinates = (x_train - mean) @ right[:keep].T
    covariance = np.cov(coordinates, rowvar=False, bias=True)  # the maximum-likelihood Gaussian
    delta = (x_test - mean) @ right[:keep].T - coordinates.mean(0)
    squared = np.einsum("bi,ij,bj->b", delta, np.linalg.inv(covariance), delta)
    expected = 0.5 * (squared + np.linalg.slogdet(2 * np.pi * covariance)[1])  # -log N(z; mu, Sigma)
    prediction = detector.predict(test)
    assert prediction.maps is None
    np.testing.assert_allclose(prediction.scores.numpy(), expected, rtol=1e-4)


# ------------------------------------------------------------------ the contract, vad run, ONNX


def test_keeps_the_contract_with_fre_maps_and_onnx_parity():
    run = check_detector(DFM)  # fake stage2 + stage3 grids 8x8, pooled 4x4 -> 2x2 maps
    assert run.maps.shape[1:] == (2, 2) and run.onnx.startswith(("parity", "skipped"))


def test_vad_run_with_nll_is_image_level_and_exports_scores_only(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    runner = CliRunner()
    common = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--device", "cpu", "--no-report", "--backbone", "fake-backbone"]
    result = runner.invoke(app, [*common, "--detector", "dfm", "--set", "dfm.score_type=nll", "--output", str(tmp_path / "nll")])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((tmp_path / "nll" / "metrics.json").read_text())
    assert "image scores only" in metrics["skipped_metrics"]["tiny-a"]["pixel_auroc"] and "pixel_auroc" not in metrics["mean"]
    saved = json.loads((tmp_path / "nll" / "tiny-a" / "model" / "model.json").read_text())
    assert saved["members"][0]["detector"]["meta"]["grid"] == [48, 8, 8]
    pytest.importorskip("onnxruntime")
    import onnx

    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel
    from vad.testing import make_tiny_splits

    model = AnomalyModel.load(tmp_path / "nll" / "tiny-a" / "model", "cpu")
    export_onnx(model, tmp_path / "nll.onnx")
    assert [output.name for output in onnx.load(str(tmp_path / "nll.onnx")).graph.output] == ["scores"]
    assert check_parity(model, tmp_path / "nll.onnx", [s.load_image() for s in make_tiny_splits().test[:3]]) <= PARITY_TOLERANCE


# ------------------------------------------------------------------ state and bad input


def test_state_round_trip_and_refusals(fitted):
    detector, _ = fitted
    test = grids(2, seed=4)
    state = detector.state()
    assert state.meta["dfm_state_version"] == DFM_STATE_VERSION and state.meta["components"] == 3
    restored = DFM(**detector.hparams)
    restored.load_state(State(dict(state.meta), dict(state.tensors)))
    assert torch.equal(restored.predict(test).maps, detector.predict(test).maps)
    fresh = DFM(**detector.hparams)
    with pytest.raises(VadError, match="dfm_state_version"):
        fresh.load_state(State({**state.meta, "dfm_state_version": 99}, state.tensors))
    with pytest.raises(VadError, match="lacks tensor"):
        fresh.load_state(State(state.meta, {k: v for k, v in state.tensors.items() if k != "pca.components"}))
    with pytest.raises(VadError, match="pooled by 1"):  # saved with pooling 2, rebuilt without pooling
        DFM(pooling_kernel_size=1, pca_components=3).load_state(state)
    assert not fresh.fitted


def test_bad_input_is_a_clear_error_and_changes_nothing(fitted):
    detector, _ = fitted
    with pytest.raises(VadError, match="not fitted"):
        DFM().predict(grids(1, seed=5))
    with pytest.raises(VadError, match="empty training set"):
        DFM().fit([])
    with pytest.raises(VadError, match=r"feature grids \[B, C, h, w\]"):
        detector.predict(grids(1, seed=5)[0])
    with pytest.raises(VadError, match="same feature source and image size"):
        detector.predict(grids(1, seed=5, size=7))
    before = detector.predict(grids(2, seed=6)).scores
    with pytest.raises(VadError, match="smaller than the 4x4 pooling window"):
        DFM().fit([grids(4, seed=7, size=3)])
    with pytest.raises(VadError, match="span only"):  # 3 images span 2 directions
        detector.fit([grids(3, seed=8)])
    with pytest.raises(VadError, match="changed"):
        detector.fit([grids(3, seed=8), grids(3, seed=8, size=6)])
    with pytest.raises(VadError, match="at least 2 images"):
        DFM().fit([grids(1, seed=9, size=8)])
    assert torch.equal(detector.predict(grids(2, seed=6)).scores, before)


@pytest.mark.parametrize("options", [{"pooling_kernel_size": 0}, {"pca_level": 0}, {"pca_level": 1.5}, {"pca_components": 0}, {"score_type": "mahalanobis"}])
def test_bad_options_are_clear_errors(options):
    with pytest.raises(OptionError):
        DFM(**options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("score_type", ["fre", "nll"])
def test_cuda_matches_cpu(score_type):
    train, test = grids(10, seed=10), grids(3, seed=11)
    cpu, cuda = (DFM(pooling_kernel_size=2, pca_components=3, score_type=score_type) for _ in range(2))
    cpu.fit([train])
    cuda.to("cuda").fit([train.cuda()])
    prediction = cuda.predict(test.cuda())
    assert prediction.scores.device.type == "cuda" and cuda.state().tensors["pca.mean"].device.type == "cpu"
    torch.testing.assert_close(prediction.scores.cpu(), cpu.predict(test).scores, rtol=1e-3, atol=1e-4)
