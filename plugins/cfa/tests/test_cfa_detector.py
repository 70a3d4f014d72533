"""CFA as a vad detector: bank initialisation, training, score, state, ONNX, features, CLI, errors.

The conformance kit (``vad.conformance.check_detector``: fit, predict, reloads, ONNX parity,
features) runs on the registered ``cfa`` in ``tests/test_conformance.py``; it is not repeated
here, to keep this plugin's share of the suite's time small.
"""

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad.contracts import State
from vad.errors import VadError
from vad.testing import check_state_refused, single_torch_thread, tiny_image_batch
from vad_cfa.detector import Cfa
from vad_cfa.network import mean_descriptor, patch_scores, squared_distances

SMALL = {"image_size": 64, "epochs": 2, "batch_size": 4, "seed": 0}
RANDOM_RESNET = {"backbone": "resnet18", "pretrained": False, "image_size": 32, "epochs": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def fitted():
    """CFA on EfficientNet-Lite0, fitted for two epochs on the tiny images."""
    detector = Cfa(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector


def test_the_options_default_to_the_official_hyper_parameters():
    options = Cfa().options
    assert (options.epochs, options.batch_size, options.image_size, options.lr, options.weight_decay) == (30, 4, 224, 1e-3, 5e-4)
    assert (options.gamma_c, options.gamma_d, options.neighbours, options.hard_negatives) == (1, 1, 3, 3)
    assert (options.radius, options.margin, options.nu, options.score_sigma) == (1e-5, 0.1, 1e-3, 4.0)
    assert options.backbone == "tf_efficientnet_lite0" and options.pretrained  # deviation: wide_resnet50_2 has no offline weights
    resnet = Cfa(**RANDOM_RESNET)
    assert [level.name for level in resnet.levels] == ["layer1", "layer2", "layer3"] and resnet.out_channels == 448  # official res18: 448


def test_the_bank_is_the_initial_descriptors_mean_and_only_descriptor_and_radius_train(fitted):
    images = tiny_image_batch(fitted)
    head = fitted.networks["head"]
    assert fitted.state().meta["input"] == {"layers": ["blocks.1", "blocks.2", "blocks.4"], "channels": [24, 40, 112], "grid": [16, 16], "bank_size": 256}
    initial = fitted.build(fitted.input_meta)["head"]  # the same seed: the descriptor before training
    mean = mean_descriptor(initial.descriptor, [fitted.encode(images)])
    torch.testing.assert_close(head.bank, mean.flatten(1).T)
    assert not torch.equal(head.descriptor.layer.conv.weight, initial.descriptor.layer.conv.weight)
    assert head.radius.item() != pytest.approx(1e-5, abs=1e-7)  # r learns (anomalib keeps it fixed)
    (optimizer,), schedules = fitted.optimizers()
    assert schedules == [] and isinstance(optimizer, torch.optim.AdamW)
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"], optimizer.defaults["amsgrad"]) == (1e-3, 5e-4, True)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(head.radius), id(head.descriptor.layer.conv.weight), id(head.descriptor.layer.conv.bias)}
    backbone = fitted.backbone.model
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())


def test_maps_and_scores_are_the_official_ones(fitted):
    from scipy.ndimage import gaussian_filter

    images = tiny_image_batch(fitted, "test")[:3]
    prediction = fitted.predict(images)
    assert prediction.maps.shape == (3, 16, 16) and bool((prediction.maps >= 0).all())
    head = fitted.networks["head"]
    descriptors = fitted.feature_source()(images)  # the adapted descriptors reproduce the map
    torch.testing.assert_close(prediction.maps, patch_scores(squared_distances(descriptors, head.bank), 3).reshape(3, 16, 16))
    # utils/metric.py: bilinear upsampling to the input size, scipy gaussian_filter(sigma=4), maximum
    upsampled = F.interpolate(prediction.maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    expected = np.stack([gaussian_filter(m, sigma=4) for m in upsampled]).reshape(3, -1).max(axis=1)
    np.testing.assert_allclose(prediction.scores.numpy(), expected, rtol=1e-5)
    raw = Cfa(**{**fitted.hparams, "score_sigma": 0.0})
    raw.load_state(fitted.state())
    np.testing.assert_allclose(raw.predict(images).scores.numpy(), upsampled.reshape(3, -1).max(axis=1), rtol=1e-6)


def test_state_round_trip_and_feature_source_rebuild(fitted):
    images = tiny_image_batch(fitted, "test")[:4]
    state = fitted.state()
    rebuilt = Cfa(**fitted.hparams)
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    first, second = fitted.predict(images), rebuilt.predict(images)
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)
    source = fitted.feature_source()
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "cfa" and source.out_channels == 176
    hparams = dict(config["hparams"])
    again = Cfa(**hparams.pop("detector")).feature_source(**hparams)
    assert again.requires_fit
    again.load_state(source.state())
    torch.testing.assert_close(again(images), source(images), rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnx / onnxruntime not installed")
def test_onnx_export_matches_torch(fitted, tmp_path):
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel, Member
    from vad.testing import make_tiny_splits

    model = AnomalyModel([Member("cfa", fitted)], batch_size=4)
    test = [sample.load_image() for sample in make_tiny_splits().test[:4]]
    export_onnx(model, tmp_path / "cfa.onnx")
    assert check_parity(model, tmp_path / "cfa.onnx", test) <= PARITY_TOLERANCE


def test_compressed_bank_and_descriptor_and_fixed_radius(fitted):
    images = tiny_image_batch(fitted)[:, :, :32, :32]
    detector = Cfa(**{**SMALL, "epochs": 1, "gamma_c": 4, "gamma_d": 2, "learn_radius": False})
    detector.fit([images])
    head = detector.networks["head"]
    assert head.bank.shape == (8 * 8 // 4, 88) and detector.feature_source().out_channels == 88
    assert head.radius.item() == pytest.approx(1e-5, rel=1e-6)  # anomalib's fixed radius
    assert detector.predict(images[:2]).maps.shape == (2, 8, 8)


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "cfa", "--device", "cpu", "--no-report",
        "--image-size", "32", "--set", "cfa.epochs=1", "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "cfa" and saved["hparams"]["image_size"] == 32 and saved["meta"]["epochs_trained"] == 1
    assert saved["hparams"]["layers"] == ["blocks.1", "blocks.2", "blocks.4"] and saved["meta"]["input"]["bank_size"] == 64
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(float(row["score"]) >= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [{"image_size": 16}, {"epochs": 0}, {"batch_size": 0}, {"gamma_c": 0}, {"gamma_d": 0}, {"neighbours": 0}, {"hard_negatives": 0},
     {"radius": -1}, {"learn_radius": "maybe"}, {"nu": 0}, {"margin": -0.1}, {"score_sigma": -1}, {"lr": 0}, {"layers": []}, {"layers": ["layer1", "layer1"]}],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Cfa(**{**RANDOM_RESNET, **options})


def test_bad_settings_and_batches_are_clear_errors(fitted):
    images = tiny_image_batch(fitted)
    small = images[:4, :, :32, :32]
    too_small = Cfa(**{**SMALL, "gamma_c": 20})  # 8 x 8 grid // 20 = 3 centroids < K + J
    with pytest.raises(VadError, match="3 centroids"):
        too_small.fit([small])
    assert not too_small.fitted
    with pytest.raises(VadError, match="gamma_d=200 leaves no descriptor channel"):
        Cfa(**{**SMALL, "gamma_d": 200}).fit([small])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    check_state_refused(fitted, Cfa(**{**SMALL, "gamma_d": 2}), images[:2])
