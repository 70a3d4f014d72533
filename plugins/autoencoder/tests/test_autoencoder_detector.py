"""The autoencoder as a vad detector: contract, defaults, training, features, ONNX, `vad run`, bad input."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import make_tiny_splits, single_torch_thread, tiny_image_batch
from vad_autoencoder.detector import Autoencoder, AutoencoderFeatures
from vad_reconstruction.losses import ssim_map

SMALL = {"image_size": 32, "latent_dim": 16, "training_samples": 8, "batch_size": 4, "epochs": 1, "seed": 0}
onnx_installed = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnx / onnxruntime not installed")


@pytest.fixture(scope="module")
def fitted():
    """An SSIM-Autoencoder fitted for two Adam steps on the tiny training images (shared)."""
    detector = Autoencoder(**SMALL, loss="ssim")
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_the_options_default_to_the_thesis_mvtec_ad_benchmark():
    options = Autoencoder().options
    assert (options.loss, options.architecture, options.image_size, options.patch_size, options.latent_dim) == ("l2", "thesis", 256, None, 128)
    assert (options.epochs, options.training_samples, options.batch_size, options.lr, options.weight_decay) == (100, 10000, 128, 2e-4, 1e-5)
    assert (options.patch_stride, options.patch_average, options.ssim_window, options.ssim_constants, options.opening) == (64, "maps", 11, "standard", 0)
    assert Autoencoder().steps_per_epoch == 79  # 10,000 samples in batches of 128, the last one partial
    assert Autoencoder.fixed_input_size and Autoencoder.steps_itself and Autoencoder.allows_mixed_precision


def test_fit_predicts_the_maximum_of_grayscale_ssim_maps(fitted):
    test = tiny_image_batch(fitted, "test")
    prediction = fitted.predict(test)
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 32, 32)
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))
    assert bool((prediction.maps >= 0).all()) and bool((prediction.maps <= 2).all())  # 1 - SSIM
    model = fitted.networks["model"]
    assert model.channels == 1 and fitted.epochs_trained == 1 and len(fitted.history) == 1
    with torch.no_grad():
        gray = test[:, :1] * 0.299 + test[:, 1:2] * 0.587 + test[:, 2:] * 0.114
        expected = 1 - ssim_map(gray, model(gray)).squeeze(1)
    torch.testing.assert_close(prediction.maps, expected)
    alone = torch.cat([fitted.predict(test[i : i + 1]).scores for i in range(3)])
    torch.testing.assert_close(alone, prediction.scores[:3])  # an image's score does not depend on its batch


def test_one_adam_step_per_batch_max_steps_and_resume(tmp_path):
    from vad.training import session

    options = {**SMALL, "training_samples": 10, "epochs": 2}  # 3 steps per epoch: 4 + 4 + 2 samples
    images = tiny_image_batch(Autoencoder(**options))
    capped = Autoencoder(**options, max_steps=4)
    assert capped.total_epochs == 2 and Autoencoder(**options, max_steps=3).total_epochs == 1
    capped.fit([images])
    parameter = next(capped.networks["model"].parameters())
    assert int(capped._optimizer.state[parameter]["step"]) == 4 and capped.epochs_trained == 2
    uninterrupted = Autoencoder(**options)
    uninterrupted.fit([images])
    # a fit of the same seed checkpoints after epoch 1; one resumed from it reaches the same weights
    with session(tmp_path, resume=False, every_minutes=0):
        Autoencoder(**options).fit([images])
    resumed = Autoencoder(**options)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images])
    assert resumed.history == uninterrupted.history
    reference = uninterrupted.state().tensors
    assert all(torch.equal(tensor, resumed.state().tensors[name]) for name, tensor in reference.items())


def test_feature_source_is_the_encoder_on_the_whole_image(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert fitted.layer_names == ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6"]  # 32 px: no leading layer
    assert features.shape == (2, 32, 8, 8) and source.out_channels == 32 and source.stride == 4
    with torch.no_grad():
        hidden = fitted.networks["model"].encoder(fitted.network_input(images))
    torch.testing.assert_close(features, hidden)
    both = fitted.feature_source(layers=["conv2", "conv6"])
    assert both(images).shape == (2, 64 + 32, 16, 16) and both.out_channels == 96 and both.stride == 2
    # texture protocol: the encoder of 32 px patches runs on the whole 64 px image
    patches = Autoencoder(**{**SMALL, "image_size": 64, "patch_size": 32})
    patches.fit([tiny_image_batch(patches)])
    assert patches.feature_source()(tiny_image_batch(patches, "test")[:1]).shape == (1, 32, 16, 16)
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "autoencoder"
    hparams = dict(config["hparams"])
    rebuilt = Autoencoder(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, AutoencoderFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features, rtol=0, atol=0)


@onnx_installed
def test_onnx_export_of_patchwise_maps_matches_torch(tmp_path):
    import onnxruntime

    from vad.export import export_onnx
    from vad.model import AnomalyModel, Member

    detector = Autoencoder(**{**SMALL, "image_size": 64, "patch_size": 32, "patch_stride": 32, "opening": 4})
    detector.fit([tiny_image_batch(detector)])
    model = AnomalyModel([Member("autoencoder", detector)], batch_size=4, sigma=0)
    export_onnx(model, tmp_path / "ae.onnx")
    images = tiny_image_batch(detector, "test")[:3]
    scores, maps = onnxruntime.InferenceSession(str(tmp_path / "ae.onnx")).run(["scores", "maps"], {"images": images.numpy()})
    prediction = detector.predict(images)
    np.testing.assert_allclose(scores, prediction.scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(maps, prediction.maps.numpy(), atol=1e-4)


@onnx_installed
def test_onnx_export_of_ssim_maps(fitted, tmp_path):
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel, Member

    model = AnomalyModel([Member("autoencoder", fitted)], batch_size=4)
    export_onnx(model, tmp_path / "ssim.onnx")
    test = [sample.load_image() for sample in make_tiny_splits().test[:4]]
    assert check_parity(model, tmp_path / "ssim.onnx", test) <= PARITY_TOLERANCE


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    output = tmp_path / "run"
    options = ["loss=ssim", "latent_dim=16", "training_samples=8", "batch_size=4", "epochs=1"]
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "autoencoder", "--device", "cpu", "--no-report", "--image-size", "32", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"autoencoder.{option}")])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "autoencoder" and saved["hparams"]["image_size"] == 32 and saved["hparams"]["loss"] == "ssim"


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 48},  # whole images: a power of two
        {"image_size": 16},
        {"patch_size": 48},
        {"image_size": 64, "patch_size": 128},
        {"patch_stride": 0},
        {"latent_dim": 0},
        {"training_samples": 0},
        {"ssim_window": 10},
        {"ssim_constants": "squared"},
        {"loss": "l1"},
        {"architecture": "resnet"},
        {"translation": 0.5},
        {"rotation": -1},
        {"opening": -1},
        {"patch_average": "mean"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Autoencoder(**{**SMALL, **options})


def test_bad_batches_layers_and_states_are_clear_errors(fitted):
    with pytest.raises(VadError, match="before predict"):
        Autoencoder(**SMALL).predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 32, 32))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(2, 1, 32, 32))
    with pytest.raises(VadError, match="32 x 32 px"):
        fitted.predict(torch.rand(2, 3, 64, 64))
    with pytest.raises(VadError, match="empty"):
        Autoencoder(**SMALL).fit([])
    with pytest.raises(VadError, match="32 x 32 px"):
        Autoencoder(**SMALL).fit([torch.rand(2, 3, 32, 32), torch.rand(2, 3, 64, 64)])
    with pytest.raises(VadError, match="not among the encoder's layers"):
        fitted.feature_source(layers=["conv9"])(torch.rand(1, 3, 32, 32))
    other = Autoencoder(**{**SMALL, "loss": "l2"})  # three input channels, not one
    with pytest.raises(VadError, match="do not fit its options"):
        other.load_state(fitted.state())
    assert not other.fitted
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before = fitted.predict(images).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State(fitted.state().meta, {}))
    torch.testing.assert_close(fitted.predict(images).scores, before, rtol=0, atol=0)
