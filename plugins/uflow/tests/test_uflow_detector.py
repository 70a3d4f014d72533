"""U-Flow as a vad detector: backbone levels, training, state, ONNX, features, the nfa threshold in `vad run`, errors."""

import csv
import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import check_detector, single_torch_thread, tiny_image_batch
from vad_uflow.detector import UFlow, UFlowFeatures
from vad_uflow.network import likelihood_map
from vad_uflow.nfa import log10_nfa_map

SMALL = {"image_size": 64, "epochs": 2, "batch_size": 4, "flow_steps": 2, "seed": 0}
RANDOM = {**SMALL, "backbone": "resnet18", "pretrained": False, "image_size": 32, "flow_steps": 1}


@pytest.fixture(scope="module")
def fitted():
    """U-Flow on EfficientNet-Lite0 features, fitted for two epochs on the tiny images."""
    detector = UFlow(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector


def test_keeps_the_contract_with_nfa_scores():
    # fit, predict, reloads, ONNX parity of the NFA map, features (tests/test_conformance.py runs the default scores)
    run = check_detector(UFlow, options={"score": "nfa"})
    assert run.onnx.startswith("parity")


def test_default_levels_and_options_are_the_official_ones():
    detector = UFlow(image_size=64)
    assert [(level.name, level.stride, level.channels) for level in detector.levels] == [("blocks.1", 4, 24), ("blocks.2", 8, 40), ("blocks.4", 16, 112)]
    assert detector.hparams["layers"] == ["blocks.1", "blocks.2", "blocks.4"]  # saved resolved
    assert detector.sizes == [(16, 16), (8, 8), (4, 4)]
    resnet = UFlow(backbone="resnet18", pretrained=False)
    assert [level.name for level in resnet.levels] == ["layer1", "layer2", "layer3"]  # the official out_indices 1-3
    assert resnet.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406)) and resnet.preprocessing.size == (256, 256)
    options = UFlow().options
    assert (options.flow_steps, options.clamp, options.hidden_ratio, options.permute_soft) == (4, 2.0, 1.0, False)
    assert (options.epochs, options.batch_size, options.lr, options.weight_decay) == (200, 8, 1e-4, 1e-5)
    assert (options.lr_end_factor, options.lr_decay_epochs, options.score, options.nfa_window, options.nfa_probability) == (0.4, 25000, "likelihood", 5, 0.9)


def test_fit_predict_and_the_maps(fitted):
    images = tiny_image_batch(fitted, "test")
    prediction = fitted.predict(images)
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 64, 64)
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))
    latents = fitted.latents(fitted.check_batch(images, "test"))
    assert [tuple(z.shape[1:]) for z in latents] == [(30, 16, 16), (30, 8, 8), (56, 4, 4)]
    torch.testing.assert_close(prediction.maps, likelihood_map(latents, (64, 64)))
    assert bool((prediction.maps >= 0).all() and (prediction.maps <= 1).all())
    assert prediction.scores[6:].min() > prediction.scores[:6].max()  # the red squares stand out
    nfa = UFlow(**{**fitted.hparams, "score": "nfa"})
    nfa.load_state(fitted.state())
    by_nfa = nfa.predict(images)
    torch.testing.assert_close(by_nfa.maps, -log10_nfa_map(latents, (64, 64)))
    torch.testing.assert_close(by_nfa.scores, by_nfa.maps.amax(dim=(1, 2)))


def test_the_backbone_is_frozen_and_the_layer_norms_and_flow_train():
    detector = UFlow(**SMALL)
    images = tiny_image_batch(detector)
    backbone = {key: value.clone() for key, value in detector.backbone.model.state_dict().items()}
    initial = {key: value.clone() for key, value in detector.build(detector.describe_input(images))["flow"].state_dict().items()}
    detector.fit([images])
    assert all(torch.equal(value, backbone[key]) for key, value in detector.backbone.model.state_dict().items())
    trained = detector.networks["flow"].state_dict()
    assert not torch.equal(trained["norms.0.weight"], initial["norms.0.weight"])
    assert not torch.equal(trained["stages.2.module_list.0.subnet.0.weight"], initial["stages.2.module_list.0.subnet.0.weight"])
    permutations = [key for key in trained if key.endswith("w_perm")]
    assert permutations and all(torch.equal(trained[key], initial[key]) for key in permutations)  # fixed, from seed
    assert detector.history[-1] < detector.history[0]


def test_adam_and_the_official_linear_schedule_stepped_per_epoch():
    detector = UFlow(**{**RANDOM, "lr": 1e-3, "lr_decay_epochs": 10})
    images = tiny_image_batch(detector)
    detector.networks = detector.build(detector.describe_input(images))
    [optimizer], [schedule] = detector.optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["weight_decay"] == 1e-5
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == sum(p.numel() for p in detector.networks["flow"].parameters())
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(1e-3 * (1 - 0.6 * 5 / 10)) and rates[11] == pytest.approx(4e-4)


def test_state_round_trip_and_seeded_training(fitted):
    images = tiny_image_batch(fitted, "test")
    state = fitted.state()
    rebuilt = UFlow(**fitted.hparams)
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    first, second = fitted.predict(images), rebuilt.predict(images)
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)
    again = UFlow(**SMALL)
    again.fit([tiny_image_batch(again)])
    assert all(torch.equal(tensor, again.state().tensors[name]) for name, tensor in state.tensors.items())


def test_onnx_export_of_the_likelihood_map_matches_torch(fitted, tmp_path):
    pytest.importorskip("onnxruntime")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel, Member
    from vad.testing import make_tiny_splits

    model = AnomalyModel([Member("uflow", fitted)], batch_size=4)
    export_onnx(model, tmp_path / "uflow.onnx")
    test = [sample.load_image() for sample in make_tiny_splits().test[4:8]]
    assert check_parity(model, tmp_path / "uflow.onnx", test) <= PARITY_TOLERANCE


def test_feature_source_is_the_latents(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert source.out_channels == 30 + 30 + 56 and features.shape == (2, 116, 16, 16)
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    latents = fitted.latents(fitted.check_batch(images, "test"))
    torch.testing.assert_close(features[:, :30], latents[0])
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "uflow"
    hparams = dict(config["hparams"])
    rebuilt = UFlow(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, UFlowFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features, rtol=0, atol=0)
    coarse = fitted.feature_source(scales=[2])(images)
    torch.testing.assert_close(coarse, latents[2])
    with pytest.raises(VadError, match="do not exist"):
        fitted.feature_source(scales=[3])(images)


def test_vad_run_with_nfa_scores_and_the_nfa_threshold(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "uflow", "--device", "cpu", "--no-report",
        "--image-size", "32", "--set", "uflow.backbone=resnet18", "--set", "uflow.pretrained=false", "--set", "uflow.flow_steps=1",
        "--set", "uflow.epochs=1", "--set", "uflow.score=nfa", "--threshold", "nfa", "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())
    assert saved["members"][0]["detector"]["hparams"]["score"] == "nfa"
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert metrics["thresholds"]["tiny-a"] == {"image": 5e-324, "pixel": 5e-324}  # just above 0: log10 NFA < 0
    assert metrics["calibration"]["tiny-a"]["method"] == "none"  # no image was held out to calibrate
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert all(int(row["decision"]) == (float(row["score"]) > 0) for row in rows)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--detector", "uflow", "--set", "uflow.backbone=resnet18", "--set", "uflow.pretrained=false"], "detector 'uflow' gives ordinary anomaly scores"),
        (["--detector", "patchcore", "--backbone", "fake-backbone"], "detector 'patchcore' gives ordinary anomaly scores"),
    ],
)
def test_the_nfa_threshold_refuses_scores_that_are_not_nfa(vad_fakes, tmp_path, options, message):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--device", "cpu", "--no-report", "--image-size", "32",
        *options, "--threshold", "nfa", "--output", str(run_folder),
    ])
    assert isinstance(result.exception, VadError), (result.output, result.exception)
    assert "--threshold nfa needs scores that are -log10 NFA" in str(result.exception) and message in str(result.exception)
    assert not run_folder.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 40},
        {"image_size": 16},
        {"flow_steps": 0},
        {"clamp": 0},
        {"hidden_ratio": 0},
        {"lr": 0},
        {"weight_decay": -1},
        {"lr_end_factor": 1.5},
        {"score": "probability"},
        {"nfa_probability": 1.0},
        {"nfa_window": 0},
        {"layers": []},
        {"layers": ["layer1", "layer1"]},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        UFlow(**{**RANDOM, **options})


def test_bad_backbones_levels_sizes_and_batches_are_clear_errors(fitted):
    images = tiny_image_batch(fitted)
    with pytest.raises(VadError, match="twice the stride"):
        UFlow(**{**RANDOM, "layers": ["layer1", "layer3"]}).fit([images])
    with pytest.raises(VadError, match="no layer 'layer9'"):
        UFlow(**{**RANDOM, "layers": ["layer1", "layer9"]}).fit([images])
    with pytest.raises(VadError, match="too small for the NFA window"):
        UFlow(**{**RANDOM, "score": "nfa", "nfa_window": 21}).preprocessing
    with pytest.raises(VadError, match="not a multiple of the coarsest"):
        UFlow(**{**RANDOM, "layers": ["layer2", "layer3", "layer4"], "image_size": 48}).preprocessing
    with pytest.raises(VadError, match="before predict"):
        UFlow(**SMALL).predict(images)
    with pytest.raises(VadError, match="empty"):
        UFlow(**SMALL).fit([])
    with pytest.raises(VadError, match=r"64 x 64 px"):
        fitted.predict(images[:, :, :32, :32])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])


def test_a_state_of_another_backbone_is_refused_and_changes_nothing(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    other = UFlow(**{**SMALL, "backbone": "resnet18", "pretrained": False})
    with pytest.raises(VadError, match="trained on backbone levels with"):
        other.load_state(fitted.state())
    assert not other.fitted
    before = fitted.predict(images).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State({"input": fitted.input_meta}, {}))
    torch.testing.assert_close(fitted.predict(images).scores, before, rtol=0, atol=0)


def test_registered_through_the_entry_point():
    from vad.plugins import get_registry
    from vad_uflow.threshold import NfaThreshold

    registry = get_registry()
    assert registry.entries("detectors")["uflow"].plugin.distribution == "vad-uflow"
    assert registry.load_class("detectors", "uflow") is UFlow
    assert registry.entries("thresholds")["nfa"].plugin.distribution == "vad-uflow"
    assert registry.load_class("thresholds", "nfa") is NfaThreshold
