"""Reverse Distillation as a vad detector: frozen encoder, shapes, state, ONNX, features, CLI, errors."""

import csv
import json

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import make_tiny_splits, single_torch_thread, tiny_image_batch
from vad_reverse_distillation.detector import ReverseDistillation, ReverseDistillationFeatures

SMALL = {"image_size": 64, "epochs": 2, "batch_size": 4, "seed": 0}


@pytest.fixture(scope="module")
def fitted():
    """Reverse Distillation on EfficientNet-Lite0, fitted for two epochs on the tiny images."""
    detector = ReverseDistillation(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_default_encoder_levels_and_generic_networks():
    detector = ReverseDistillation(image_size=64)
    assert [(level.name, level.stride, level.channels) for level in detector.levels] == [("blocks.1", 4, 24), ("blocks.2", 8, 40), ("blocks.4", 16, 112)]
    assert detector.hparams["layers"] == ["blocks.1", "blocks.2", "blocks.4"]  # saved resolved
    assert detector.preprocessing.size == (64, 64) and detector.preprocessing.mean == detector.encoder.preprocessing.mean


@pytest.mark.parametrize("options", [{}, {"encoder": "resnet18", "pretrained": False}])
def test_decoder_output_shapes_match_the_encoder_stages(options):
    detector = ReverseDistillation(image_size=64, **options)
    images = torch.rand(2, 3, 64, 96)
    networks = detector.build(detector.describe_input(images))
    levels = detector.encode(images)
    decoded = networks["decoder"](networks["bottleneck"](levels))
    assert [tuple(d.shape) for d in decoded] == [tuple(level.shape) for level in levels]
    assert [level.shape[1] for level in levels] == [level.channels for level in detector.levels]


def test_resnet18_encoder_gets_the_official_networks_on_timms_layer1_to_3():
    detector = ReverseDistillation(encoder="resnet18", pretrained=False)
    assert [level.name for level in detector.levels] == ["layer1", "layer2", "layer3"]
    networks = detector.build({})
    # the official BN_layer (without conv4/bn4) and de_resnet18 sizes (tests/test_network.py)
    assert sum(p.numel() for p in networks["bottleneck"].parameters()) == 11_680_000
    assert sum(p.numel() for p in networks["decoder"].parameters()) == 3_703_168


def test_the_encoder_is_frozen():
    detector = ReverseDistillation(**SMALL)
    before = {k: v.clone() for k, v in detector.encoder.model.state_dict().items()}
    detector.fit([tiny_image_batch(detector)])
    encoder = detector.encoder.model
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # BN statistics too
    (optimizer,), _ = detector.optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for name in ("bottleneck", "decoder") for p in detector.networks[name].parameters()}
    assert not any(key.startswith("encoder") for key in detector.state().tensors)


def test_fit_lowers_the_loss_and_predicts_maps_at_the_input_size(fitted):
    assert fitted.epochs_trained == 2 and len(fitted.history) == 2
    prediction = fitted.predict(tiny_image_batch(fitted, "test"))
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 64, 64)
    assert (prediction.maps >= 0).all() and (prediction.maps <= 6).all()  # three levels of 1 - cos in [0, 2]
    longer = ReverseDistillation(**{**SMALL, "epochs": 4})
    longer.fit([tiny_image_batch(longer)])
    assert longer.history[-1] < longer.history[0]


def test_same_seed_same_training():
    first, second = ReverseDistillation(**SMALL), ReverseDistillation(**SMALL)
    first.fit([tiny_image_batch(first)])
    second.fit([tiny_image_batch(second)])
    for name, tensor in first.state().tensors.items():
        assert torch.equal(tensor, second.state().tensors[name]), name


@pytest.mark.parametrize("options", [{}, {"encoder": "resnet18", "pretrained": False, "map_mode": "multiply", "loss": "per-position"}])
def test_saved_and_loaded_state_gives_the_same_scores(tmp_path, options):
    from safetensors.torch import load_file, save_file

    detector = ReverseDistillation(**{**SMALL, "epochs": 1, **options})
    detector.fit([tiny_image_batch(detector)])
    test = tiny_image_batch(detector, "test")
    expected = detector.predict(test)
    state = detector.state()
    save_file(state.tensors, tmp_path / "state.safetensors")
    (tmp_path / "meta.json").write_text(json.dumps(state.meta))
    hparams = json.loads(json.dumps(detector.hparams))
    loaded = ReverseDistillation(**hparams)  # a random encoder is drawn again from the seed
    loaded.load_state(State(json.loads((tmp_path / "meta.json").read_text()), load_file(tmp_path / "state.safetensors")))
    again = loaded.predict(test)
    torch.testing.assert_close(again.scores, expected.scores)
    torch.testing.assert_close(again.maps, expected.maps)


@pytest.mark.parametrize("options", [{"map_mode": "multiply", "sigma": 2.0}])  # the conformance kit checks the defaults
def test_onnx_export_matches_torch(tmp_path, options):
    pytest.importorskip("onnxruntime")
    from vad.export import check_parity, export_onnx
    from vad.model import AnomalyModel, Member

    splits = make_tiny_splits()
    model = AnomalyModel([Member("reverse-distillation", ReverseDistillation(**{**SMALL, **options}), None)], batch_size=4)
    model.fit(splits.train, [])
    export_onnx(model, tmp_path / "rd.onnx")
    images = [s.load_image() for s in splits.test[:3]]
    assert check_parity(model, tmp_path / "rd.onnx", images) < 1e-4


def test_feature_source_cut_points_and_rebuild(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert features.shape == (2, 224, 2, 2) and source.out_channels == 2 * 112  # the embedding, stride 32
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "reverse-distillation"
    hparams = dict(config["hparams"])
    rebuilt = ReverseDistillation(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, ReverseDistillationFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features)
    decoded = fitted.feature_source(layers=["decoder2", "bottleneck"])
    assert decoded(images).shape == (2, 40 + 224, 8, 8) == (2, decoded.out_channels, 8, 8)
    with pytest.raises(VadError):
        fitted.feature_source(layers=["encoder"])


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app
    from vad.model import AnomalyModel

    output = tmp_path / "run"
    options = ["image_size=64", "epochs=2", "batch_size=4"]
    arguments = ["run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "reverse-distillation", "--device", "cpu", "--no-report", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"reverse-distillation.{option}")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    model = AnomalyModel.load(output / "tiny-a" / "model")
    with open(output / "tiny-a" / "scores.csv") as handle:
        saved = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    again = {o.sample.path: o.score for o in model.predict(make_tiny_splits("tiny-a", seed=0).test)}
    np.testing.assert_allclose([again[path] for path in saved], list(saved.values()), rtol=1e-5, atol=1e-6)


def test_embedding_as_a_patchcore_backbone(vad_fakes, tmp_path):
    pytest.importorskip("vad_patchcore")
    from vad.config import RunConfig
    from vad.pipeline import run

    config = RunConfig(
        dataset="tiny", backbones=["detector:reverse-distillation"], detectors=["patchcore"], threshold="max",
        output=str(tmp_path / "run"), device="cpu", report=False, categories=["tiny-a"],
        options={"reverse-distillation": {"image_size": 64, "epochs": 1, "batch_size": 4}},
    )
    _, results = run(config)
    assert 0 <= results[0].metrics["image_auroc"] <= 1


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 100},
        {"image_size": 0},
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": -1.0},
        {"betas": [0.5]},
        {"betas": [0.5, 1.0]},
        {"layers": ["blocks.1"]},
        {"loss": "mse"},
        {"map_mode": "max"},
        {"sigma": -1},
        {"seed": "zero"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        ReverseDistillation(**{**SMALL, **options})


def test_bad_encoders_are_clear_errors():
    with pytest.raises(VadError, match="unknown backbone 'resnet_18'"):
        ReverseDistillation(encoder="resnet_18").preprocessing
    with pytest.raises(VadError, match="does not exist"):
        ReverseDistillation(encoder="resnet18", weights="/does/not/exist.safetensors").preprocessing
    with pytest.raises(VadError, match="twice the stride"):
        ReverseDistillation(layers=["blocks.1", "blocks.2", "blocks.6"]).levels
    with pytest.raises(VadError, match="has no layer"):
        ReverseDistillation(layers=["blocks.1", "blocks.2", "nope"]).levels


def test_bad_batches_and_order_of_calls(fitted):
    with pytest.raises(VadError, match="before predict"):
        ReverseDistillation(**SMALL).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(VadError, match="multiples of 32"):
        fitted.predict(torch.rand(1, 3, 48, 64))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 64, 64))
    with pytest.raises(VadError, match="empty"):
        ReverseDistillation(**SMALL).fit([])


def test_a_state_for_another_encoder_is_refused_and_changes_nothing(fitted):
    other = ReverseDistillation(**{**SMALL, "encoder": "resnet18", "pretrained": False})
    with pytest.raises(VadError, match="trained on encoder levels with"):
        other.load_state(fitted.state())
    assert not other.fitted
    with pytest.raises(VadError, match="do not fit"):
        ReverseDistillation(**SMALL).load_state(State(fitted.state().meta, {}))



def test_run_weights_and_no_pretrained_reach_the_encoder(tmp_path):
    from vad.build import build_model
    from vad.config import RunConfig

    weights = tmp_path / "encoder.safetensors"
    model = build_model(RunConfig(detectors=["reverse-distillation"], weights=str(weights), pretrained=False, options={"reverse-distillation": {"encoder": "timm:resnet18"}}))
    options = model.members[0].detector.options
    assert (options.weights, options.pretrained) == (str(weights), False)
    with pytest.raises(VadError, match="no part of this run loads network weights"):
        build_model(RunConfig(detectors=["draem"], weights=str(weights)))
