"""Tests of vad-gmm-texture: the likelihood against scikit-learn and SciPy, the pyramid and the
combination of its levels, the hold-out, the contract (conformance kit, ONNX), `vad run`, and
bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture

from vad.conformance import check_detector
from vad.errors import VadError
from vad.options import OptionError
from vad.postprocess import bilinear_matrix
from vad.testing import check_state_refused, single_torch_thread, striped_images
from vad_gmm_texture.detector import GmmTexture
from vad_gmm_texture.model import TextureScorer, mixture_log_density, pyramid, to_gray

TINY = {"levels": 2, "components": 2, "max_samples": 1500, "max_iter": 50}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread: tiny tensors, shared cores."""


def textures(count: int, seed: int) -> torch.Tensor:
    """Striped gray images in [0, 1], ``[count, 3, 32, 36]``."""
    return (striped_images(count, 36, seed)[..., :32, :] * 0.2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted():
    """A two-level model of eleven training images (one held out to standardise the levels)."""
    with single_torch_thread():
        train = textures(11, seed=0)
        detector = GmmTexture(**TINY)
        detector.fit([train[:6], train[6:]])
        return train, detector


def reflect_patches(image: np.ndarray, size: int) -> np.ndarray:
    """Every pixel's ``size x size`` patch (mirrored borders) as rows ``[h * w, size^2]``."""
    pad = size // 2
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(image, pad, mode="reflect"), (size, size))
    return windows.reshape(-1, size * size)


# ------------------------------------------------------------------ the likelihood


def test_mixture_log_density_matches_scipy():
    rng = np.random.default_rng(0)
    means, weights = rng.normal(size=(2, 3)), np.array([0.3, 0.7])
    factors = rng.normal(size=(2, 3, 3))
    covariances = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(3)
    precisions_cholesky = np.linalg.cholesky(np.linalg.inv(covariances))  # Sigma^-1 = P P^T, as scikit-learn
    x = rng.normal(size=(1, 3, 2, 4))
    transforms = torch.tensor(precisions_cholesky.transpose(0, 2, 1))
    offsets = -torch.einsum("kij,kj->ki", transforms, torch.tensor(means))
    log_norms = torch.tensor(np.log(weights) + np.log(np.diagonal(precisions_cholesky, axis1=1, axis2=2)).sum(1) - 1.5 * np.log(2 * np.pi))
    got = mixture_log_density(torch.tensor(x), transforms, offsets, log_norms)
    points = x[0].reshape(3, -1).T
    expected = logsumexp([np.log(w) + multivariate_normal(m, c).logpdf(points) for w, m, c in zip(weights, means, covariances)], axis=0)
    np.testing.assert_allclose(got.numpy().reshape(-1), expected, rtol=1e-10)


def test_level_likelihood_matches_scikit_learn_on_every_patch():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(9, 11))
    rows = reflect_patches(image, 3)
    mean, std = rows.mean(0), rows.std(0)
    mixture = GaussianMixture(3, covariance_type="full", random_state=0).fit((rows - mean) / std)
    kernels = torch.tensor(np.eye(9) / std[:, None], dtype=torch.float32).view(1, 9, 1, 3, 3)
    biases = torch.tensor(-mean / std, dtype=torch.float32)[None]
    tensors = [torch.tensor(v, dtype=torch.float32)[None] for v in (mixture.means_, mixture.precisions_cholesky_, mixture.weights_)]
    scorer = TextureScorer(kernels, biases, *tensors, torch.zeros(1), torch.ones(1))
    gray = torch.tensor(image, dtype=torch.float32).expand(1, 3, 9, 11)  # equal channels: luma = gray
    nll = scorer.level_nll(gray)[0]
    expected = -mixture.score_samples((rows - mean) / std).reshape(9, 11)
    np.testing.assert_allclose(nll[0].numpy(), expected, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ pyramid, combination, fit


def test_pyramid_levels_and_their_combination(fitted):
    train, detector = fitted
    scorer = detector.scorer()
    images = textures(2, seed=5)
    nll = scorer.level_nll(images)
    gray = to_gray(images)
    halved = gray[:, 0].double().numpy().reshape(2, 16, 2, 18, 2).mean((2, 4))  # 2 x 2 block means
    np.testing.assert_allclose(pyramid(gray, 2)[1][:, 0].numpy(), halved, rtol=1e-6)
    assert [tuple(level.shape) for level in nll] == [(2, 32, 36), (2, 16, 18)]
    mean, std = detector.params["nll_mean"].double().numpy(), detector.params["nll_std"].double().numpy()
    level0 = (nll[0].double().numpy() - mean[0]) / std[0]
    level1 = bilinear_matrix(16, 32) @ ((nll[1].double().numpy() - mean[1]) / std[1]) @ bilinear_matrix(18, 36).T
    expected = (level0 + level1) / 2
    prediction = detector.predict(images)
    np.testing.assert_allclose(prediction.maps.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prediction.scores.numpy(), expected.reshape(2, -1).max(1), rtol=1e-4, atol=1e-4)


def test_levels_are_standardised_on_held_out_images(fitted):
    train, detector = fitted
    info = detector.fit_info
    held = info["normalization_positions"]
    assert info["train_images"] == 11 and len(held) == 1 and info["mixture_images"] == 10 and not info["normalization_in_sample"]
    nll = detector.scorer().level_nll(train[held])
    for level in range(2):
        values = nll[level].double()
        assert abs(float(values.mean()) - float(detector.params["nll_mean"][level])) < 1e-3
        assert abs(float(values.std(unbiased=False)) - float(detector.params["nll_std"][level])) < 1e-3
    capped = GmmTexture(**TINY, max_images=3, normalization_fraction=0.0)
    capped.fit([train[:4]])
    assert capped.fit_info["mixture_images"] == 3 and capped.fit_info["normalization_in_sample"]
    mostly_held = GmmTexture(**TINY, normalization_fraction=0.9)
    mostly_held.fit([train[:2]])  # one image always remains for the mixtures
    assert mostly_held.fit_info["mixture_images"] == 1 and len(mostly_held.fit_info["normalization_positions"]) == 1


def test_a_defect_stands_out_and_the_model_scores_other_sizes(fitted):
    _, detector = fitted
    good = textures(1, seed=7)
    bad = good.clone()
    bad[..., 10:16, 12:18] = 0.9
    prediction = detector.predict(torch.cat([good, bad]))
    peak = divmod(int(prediction.maps[1].argmax()), 36)
    assert 7 <= peak[0] < 19 and 9 <= peak[1] < 21 and prediction.scores[1] > prediction.scores[0]
    larger = detector.predict(textures(1, seed=8).repeat(1, 1, 2, 2))  # shift-invariant patches: any size
    assert larger.maps.shape == (1, 64, 72)


# ------------------------------------------------------------------ contract


def test_conformance_kit_with_compressed_patches():
    run = check_detector(GmmTexture, options={"projection_dim": 12})  # defaults: tests/test_conformance.py
    assert run.onnx.startswith("parity")


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    output = tmp_path / "run"
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "gmm-texture", "--device", "cpu", "--no-report", "--image-size", "32", "--sigma", "0", "-o", str(output)]
    options = [arg for key, value in TINY.items() for arg in ("--set", f"gmm-texture.{key}={value}")]
    result = CliRunner().invoke(app, arguments + options)
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "gmm-texture" and saved["hparams"]["levels"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(fitted):
    train, cpu = fitted
    cuda = GmmTexture(**TINY).to("cuda")
    cuda.load_state(cpu.state())
    images = textures(2, seed=9)
    prediction = cuda.predict(images.cuda())
    assert prediction.maps.device.type == "cuda"
    torch.testing.assert_close(prediction.maps.cpu(), cpu.predict(images).maps, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ bad input


def test_bad_inputs_are_clear_errors_that_change_nothing(fitted):
    train, detector = fitted
    fresh = GmmTexture(**TINY)
    with pytest.raises(VadError, match="not fitted"):
        fresh.predict(train[:1])
    with pytest.raises(VadError, match="empty training set"):
        fresh.fit([])
    with pytest.raises(VadError, match=r"leave 3 px on the top of 4 pyramid levels"):
        GmmTexture(**{**TINY, "levels": 4}).fit([train[..., :24, :24]])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fresh.fit([train[:, :1]])
    with pytest.raises(VadError, match="64 patches for 70 mixture components"):
        GmmTexture(levels=1, components=70, max_samples=100).fit([train[:1, :, :8, :8]])
    assert not fresh.fitted
    with pytest.raises(VadError, match=r"leave 4 px"):
        detector.predict(train[:1, :, :8, :8])
    check_state_refused(detector, GmmTexture(**{**TINY, "levels": 3}), train[:2])
    with pytest.raises(OptionError, match="projection_dim"):
        GmmTexture(projection_dim=50)
    with pytest.raises(OptionError, match="patch_size"):
        GmmTexture(patch_size=6)
    with pytest.raises(OptionError, match=r"image_size=48 is not allowed; image_size must be at least patch_size \* 2\^\(levels - 1\) = 56"):
        GmmTexture(image_size=48)
