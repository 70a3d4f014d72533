"""FRE: official defaults, pooling and map shapes, the error map and score by hand, the PCA
against numpy's SVD, training on cached features, the contract, the residual source, `vad run`,
bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from vad.errors import VadError
from vad.testing import check_detector, check_state_refused, single_torch_thread, tiny_image_batch
from vad_fre.detector import Fre, FreFeatures
from vad_fre.network import PlainAE, TiedAE, explained_count, fre_scores_and_maps, principal_subspace, residual

#: vad's fake backbone at 64 px: its stride-16 level stage3 is 32 x 4 x 4, pooled 2 x 2 (128 values per image).
FAKE = {"backbone": "fake-backbone", "pretrained": False, "image_size": 64, "epochs": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def fitted() -> Fre:
    """The tied autoencoder on the fake backbone, two epochs of two steps on the tiny images."""
    from vad.plugins import registered
    from vad.testing import FakesPlugin

    detector = Fre(**FAKE)
    with registered(FakesPlugin(), "vad-testing-fakes"), single_torch_thread():
        detector.fit([tiny_image_batch(detector)])  # the backbone is built here, once
    return detector


def numpy_pca(vectors: torch.Tensor, variance: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean, components and scikit-learn's component count for ``variance``, from numpy's SVD."""
    data = vectors.double().numpy()
    mean = data.mean(axis=0)
    _, singular, right = np.linalg.svd(data - mean, full_matrices=False)
    ratios = np.cumsum(singular**2) / np.sum(singular**2)
    count = int(np.argmax(ratios > variance)) + 1  # the first cumulative ratio exceeding it
    return mean, right[:count], count


def test_defaults_follow_the_official_code(vad_fakes):
    options = Fre().options
    assert (options.mode, options.latent_dim, options.pca_variance) == ("tied-ae", None, 0.97)
    assert (options.epochs, options.batch_size, options.lr) == (250, 64, 1e-3)
    assert (options.image_size, options.pooling) == (256, 2)
    assert options.backbone == "tf_efficientnet_lite0" and options.pretrained  # deviation: resnet50 has no offline weights
    resnet = Fre(backbone="resnet18", pretrained=False, image_size=64)
    assert (resnet.level.name, resnet.level.stride, resnet.level.channels) == ("layer3", 16, 256) and resnet.hparams["layer"] == "layer3"  # official and anomalib, saved resolved
    assert resnet.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.preprocessing.size == (64, 64)
    assert Fre(**FAKE, layer="stage2").level.name == "stage2"


def test_pooling_and_map_shapes(fitted, vad_fakes):
    images = tiny_image_batch(fitted, "test")[:3]
    level = fitted.encode(images)
    assert level.shape == (3, 32, 4, 4) and fitted.feature_shape() == [32, 2, 2]
    by_hand = level.reshape(3, 32, 2, 2, 2, 2).mean(dim=(3, 5))  # 2 x 2 blocks, stride 2
    torch.testing.assert_close(fitted.features(images), by_hand)
    assert fitted.input_meta["shape"] == [32, 2, 2]
    assert fitted.predict(images).maps.shape == (3, 2, 2)  # on the pooled grid: vad upsamples
    assert Fre(**FAKE, pooling=1).feature_shape() == [32, 4, 4]
    assert Fre(**{**FAKE, "image_size": 80}).feature_shape() == [32, 2, 2]  # 5 x 5 pooled with floor, as avg_pool2d
    with pytest.raises(VadError, match="smaller than the 4 x 4 pooling"):
        Fre(**{**FAKE, "image_size": 32, "pooling": 4}).feature_shape()


def test_error_map_and_score_by_hand(fitted):
    # one image, 2 channels on a 1 x 2 grid, flattened channel-major: [c0p0, c0p1, c1p0, c1p1] = [1, 2, 3, 4]
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    tied = TiedAE(4, 2)
    tied.set_subspace(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1]]), torch.zeros(4))  # keeps c0p0 and c1p1
    error = residual(features, tied)
    assert error.tolist() == [[[[0.0, 2.0]], [[3.0, 0.0]]]]
    scores, maps = fre_scores_and_maps(error)
    assert maps.tolist() == [[[4.5, 2.0]]]  # (0 + 3^2) / 2 channels, (2^2 + 0) / 2
    torch.testing.assert_close(scores, torch.tensor([13.0]).sqrt())  # the l2-norm of the error

    images = tiny_image_batch(fitted, "test")[:3]
    autoencoder = fitted.networks["autoencoder"]
    weight, encoder_bias, decoder_bias = autoencoder.weight, autoencoder.encoder_bias, autoencoder.decoder_bias
    vectors = fitted.encode(images).reshape(3, 32, 2, 2, 2, 2).mean(dim=(3, 5)).reshape(3, -1)
    reconstruction = (vectors @ weight.T + encoder_bias) @ weight + decoder_bias  # W^T (W x + b_enc) + b_dec
    squared = ((vectors - reconstruction) ** 2).reshape(3, 32, 2, 2)
    prediction = fitted.predict(images)
    torch.testing.assert_close(prediction.maps, squared.sum(dim=1) / 32)
    torch.testing.assert_close(prediction.scores, squared.sum(dim=(1, 2, 3)).sqrt())
    with torch.no_grad():
        torch.testing.assert_close(fitted.training_step(fitted.features(images), torch.Generator()), ((vectors - reconstruction) ** 2).mean())


def test_pca_is_numpys_svd(vad_fakes):
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(12, 3, generator=generator) @ torch.randn(3, 30, generator=generator) + 0.05 * torch.randn(12, 30, generator=generator)
    mean, components, count = numpy_pca(vectors, 0.97)
    ours, our_mean = principal_subspace(vectors, None, 0.97)
    assert ours.shape == (count, 30) and count == 3
    np.testing.assert_allclose(our_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose((ours.T @ ours).numpy(), components.T @ components, atol=1e-5)  # the same subspace, any signs
    assert principal_subspace(vectors, 5, 0.97)[0].shape == (5, 30)
    singular = torch.tensor([5.0, 3.0, 2.0]).sqrt()  # explained ratios 0.5, 0.3, 0.2
    assert [explained_count(singular, v) for v in (0.49, 0.51, 0.79, 0.81, 0.99)] == [1, 2, 2, 3, 3]  # first cumsum > v

    detector = Fre(**{**FAKE, "mode": "pca"})
    images = tiny_image_batch(detector)
    detector.fit([images[:5], images[5:]])
    vectors = detector.features(images).flatten(1)
    mean, components, count = numpy_pca(vectors, 0.97)
    autoencoder = detector.networks["autoencoder"]
    assert detector.input_meta["latent_dim"] == count and detector.history == [] and detector.cheap_to_refit
    np.testing.assert_allclose((autoencoder.weight.T @ autoencoder.weight).numpy(), components.T @ components, atol=1e-5)
    np.testing.assert_allclose(autoencoder.decoder_bias.numpy(), mean, rtol=1e-5, atol=1e-5)
    test = detector.features(tiny_image_batch(detector, "test")).flatten(1)
    expected = mean + (test.double().numpy() - mean) @ components.T @ components  # mean + W^T W (x - mean)
    with torch.no_grad():
        np.testing.assert_allclose(autoencoder(test).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert Fre(**FAKE).cheap_to_refit is False


def test_training_runs_the_backbone_once_and_the_loop_over_the_vectors(vad_fakes):
    detector = Fre(**{**FAKE, "epochs": 3, "mode": "ae"})
    images = tiny_image_batch(detector)
    seen = []
    encode = detector.frozen.encode
    detector.frozen.encode = lambda batch: seen.append(len(batch)) or encode(batch)
    detector.fit([images])
    assert sum(seen) == len(images) + 1  # each training image once, plus the shape probe
    assert detector.epochs_trained == 3 and len(detector.history) == 3 and detector.history[-1] < detector.history[0]
    assert detector.training_passes == 1 and detector.minibatch() == 4
    autoencoder = detector.networks["autoencoder"]
    assert isinstance(autoencoder, PlainAE) and (autoencoder.encoder.in_features, autoencoder.encoder.out_features) == (128, 7)
    (optimizer,), schedules = detector.optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0 and schedules == []


def test_keeps_the_contract_closed_form_with_onnx_parity():
    run = check_detector(Fre, options={"backbone": "resnet18", "pretrained": False, "mode": "pca"})  # tied-ae on lite0: tests/test_conformance.py
    assert run.onnx.startswith("parity") and run.maps.shape[1:] == (2, 2)


def test_feature_source_is_the_residual(fitted, vad_fakes):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    residuals = source(images)
    assert isinstance(source, FreFeatures) and source.out_channels == 32 and residuals.shape == (2, 32, 2, 2)
    torch.testing.assert_close(residuals.square().mean(dim=1), fitted.predict(images).maps)
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "fre"
    hparams = dict(config["hparams"])
    rebuilt = Fre(**hparams.pop("detector")).feature_source(**hparams)
    assert rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), residuals, rtol=0, atol=0)


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "fre", "--device", "cpu", "--no-report",
        "--image-size", "32", "--set", "fre.backbone=fake-backbone", "--set", "fre.pretrained=false", "--set", "fre.epochs=2",
        "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "fre" and saved["hparams"]["image_size"] == 32 and saved["hparams"]["layer"] == "stage3"
    assert saved["meta"]["input"]["shape"] == [32, 1, 1] and saved["meta"]["epochs_trained"] == 2
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 12


@pytest.mark.parametrize(
    "options",
    [{"image_size": 16}, {"pooling": 0}, {"latent_dim": 0}, {"pca_variance": 0}, {"pca_variance": 1.0}, {"epochs": 0}, {"batch_size": 0}, {"lr": 0}, {"mode": "kpca"}],
)
def test_bad_options_are_clear_errors(options, vad_fakes):
    with pytest.raises(VadError):
        Fre(**{**FAKE, **options})


def test_bad_input_is_a_clear_error_and_changes_nothing(fitted, vad_fakes):
    images = tiny_image_batch(fitted)
    with pytest.raises(VadError, match="before predict"):
        Fre(**FAKE).predict(images)
    with pytest.raises(VadError, match="empty training set"):
        Fre(**FAKE).fit([])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match="64 x 64"):  # the autoencoder is built for image_size
        fitted.predict(images[:, :, :32, :32])
    before = {name: value.clone() for name, value in fitted.state().tensors.items()}
    with pytest.raises(VadError, match="no bottleneck"):
        Fre(**{**FAKE, "latent_dim": 128}).fit([images])
    with pytest.raises(VadError, match="do not vary"):  # the PCA rule on a single image
        Fre(**FAKE).fit([images[:1]])
    with pytest.raises(VadError, match="at most 8"):
        Fre(**{**FAKE, "mode": "pca", "latent_dim": 9}).fit([images])
    with pytest.raises(VadError, match="do not vary"):
        fitted.fit([images[:1]])
    assert all(torch.equal(value, before[name]) for name, value in fitted.state().tensors.items())
    check_state_refused(fitted, Fre(**{**FAKE, "image_size": 96}), images, other_match="load it with the options", empty_match="incomplete")
    with pytest.raises(VadError, match="hub is unreachable"):  # resnet50's weights do not ship offline
        Fre(backbone="resnet50").fit([images])
