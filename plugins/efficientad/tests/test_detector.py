"""EfficientAD as a vad detector: contract, frozen teacher, schedule, state, ONNX, features, CLI, distillation."""

import csv
import json

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import make_tiny_splits, single_torch_thread, tiny_image_batch
from vad_efficientad.detector import EfficientAd, EfficientAdFeatures

SMALL = {"image_size": 64, "max_steps": 4, "distill_steps": 2, "distill_batch_size": 4, "seed": 0}


@pytest.fixture(scope="module")
def fitted():
    detector = EfficientAd(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_declares_the_official_defaults():
    options = EfficientAd().options
    assert (options.model_size, options.image_size, options.max_steps, options.batch_size) == ("small", 256, 70000, 1)
    assert (options.lr, options.weight_decay, options.lr_drop, options.validation_fraction) == (1e-4, 1e-5, 0.95, 0.1)
    assert EfficientAd().preprocessing.mean == (0.485, 0.456, 0.406) and EfficientAd().preprocessing.size == (256, 256)


def test_fit_predicts_padded_maps_and_fits_quantiles(fitted):
    prediction = fitted.predict(tiny_image_batch(fitted, "test"))
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 16, 16)
    assert prediction.maps[:, :4].abs().sum() == 0  # the official zero padding
    model = fitted.networks["model"]
    assert float(model.q_st_end) > float(model.q_st_start) and float(model.q_ae_end) > float(model.q_ae_start)
    assert fitted.teacher_facts["source"] == "distilled" and fitted.teacher_facts["steps"] == 2
    assert fitted.epochs_trained >= 1 and fitted.options.epochs is None  # resolved for the fit only


def test_quantiles_come_from_held_out_images():
    detector = EfficientAd(**SMALL)
    train = tiny_image_batch(detector)
    held = {}
    original = detector._fit_quantiles
    detector._fit_quantiles = lambda validation: (held.setdefault("v", validation), original(validation))
    detector.fit([train])
    assert held["v"].shape[0] == 1  # 10 % of 8 images, at least one (int(0.9 * 8) = 7 train)
    assert not any(torch.equal(held["v"][0], image) for image in detector_train_images(detector, train))


def detector_train_images(detector, train):
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(detector.options.seed))
    return [train[i] for i in order[:7]]


def test_the_teacher_is_frozen_and_only_student_and_autoencoder_train(tmp_path):
    detector = EfficientAd(**SMALL)
    train = tiny_image_batch(detector)
    detector.fit([train])
    teacher = {k: v.clone() for k, v in detector.networks["model"].teacher.state_dict().items()}
    # train again from the same teacher file: the teacher must stay as loaded
    from vad_efficientad.distill import save_teacher

    save_teacher(tmp_path / "t.safetensors", detector.networks["model"].teacher, {"model_size": "small"})
    again = EfficientAd(**{**SMALL, "teacher_weights": str(tmp_path / "t.safetensors")})
    again.fit([train])
    model = again.networks["model"]
    assert all(torch.equal(teacher[k], v) for k, v in model.teacher.state_dict().items())
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert again.teacher_facts["source"] == "file"
    optimizer = torch.optim.Adam  # the optimiser sees student and autoencoder only
    (built,), _ = again.optimizers()
    assert isinstance(built, optimizer)
    trained = {id(p) for group in built.param_groups for p in group["params"]}
    assert trained == {id(p) for p in [*model.student.parameters(), *model.autoencoder.parameters()]}


def test_learning_rate_drops_tenfold_after_95_percent():
    detector = EfficientAd(**SMALL)
    detector._total_steps = 70000
    assert detector.learning_rate(0) == detector.learning_rate(66499) == 1e-4
    assert detector.learning_rate(66500) == detector.learning_rate(69999) == pytest.approx(1e-5)


def test_epochs_follow_max_steps():
    detector = EfficientAd(**{**SMALL, "max_steps": 10})
    steps = []
    original = detector.training_step
    detector.training_step = lambda batch, generator: (steps.append(detector.steps_done()), original(batch, generator))[1]
    detector.fit([tiny_image_batch(detector)])
    assert steps == list(range(10)) and detector.epochs_trained == 2  # 7 training images per pass


def test_same_seed_same_training():
    first, second = EfficientAd(**SMALL), EfficientAd(**SMALL)
    first.fit([tiny_image_batch(first)])
    second.fit([tiny_image_batch(second)])
    for name, tensor in first.state().tensors.items():
        assert torch.equal(tensor, second.state().tensors[name]), name


def test_saved_and_loaded_state_gives_the_same_scores(tmp_path, fitted):
    from safetensors.torch import load_file, save_file

    test = tiny_image_batch(fitted, "test")
    expected = fitted.predict(test)
    state = fitted.state()
    save_file(state.tensors, tmp_path / "state.safetensors")
    (tmp_path / "meta.json").write_text(json.dumps(state.meta))
    loaded = EfficientAd(**json.loads(json.dumps(fitted.hparams)))
    loaded.load_state(State(json.loads((tmp_path / "meta.json").read_text()), load_file(tmp_path / "state.safetensors")))
    again = loaded.predict(test)
    torch.testing.assert_close(again.scores, expected.scores)
    torch.testing.assert_close(again.maps, expected.maps)
    assert loaded.teacher_facts == fitted.teacher_facts


def test_onnx_export_matches_torch_for_medium(tmp_path):
    pytest.importorskip("onnxruntime")
    from vad.export import check_parity, export_onnx
    from vad.model import AnomalyModel, Member

    splits = make_tiny_splits()
    model = AnomalyModel([Member("efficientad", EfficientAd(**{**SMALL, "model_size": "medium", "max_steps": 2}), None)], batch_size=4)
    model.fit(splits.train, [])
    export_onnx(model, tmp_path / "ead.onnx")
    images = [s.load_image() for s in splits.test[:3]]
    assert check_parity(model, tmp_path / "ead.onnx", images) < 1e-4


def test_feature_source_cut_points_and_rebuild(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert features.shape == (2, 768, 8, 8) and source.out_channels == 768
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    # the squared mean of the first half is the (unnormalised) student-teacher map
    map_st, _ = fitted.networks["model"].raw_maps(images)
    torch.testing.assert_close((features[:, :384] ** 2).mean(1), map_st)
    config = json.loads(json.dumps(source.config()))
    hparams = dict(config["hparams"])
    rebuilt = EfficientAd(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, EfficientAdFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features)
    assert fitted.feature_source(output="teacher")(images).shape == (2, 384, 8, 8)


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app
    from vad.model import AnomalyModel

    output = tmp_path / "run"
    options = ["image_size=64", "max_steps=4", "distill_steps=2", "distill_batch_size=4"]
    arguments = ["run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "efficientad", "--device", "cpu", "--no-report", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"efficientad.{option}")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    model = AnomalyModel.load(output / "tiny-a" / "model")
    with open(output / "tiny-a" / "scores.csv") as handle:
        saved = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    again = {o.sample.path: o.score for o in model.predict(make_tiny_splits("tiny-a", seed=0).test)}
    np.testing.assert_allclose([again[path] for path in saved], list(saved.values()), rtol=1e-5, atol=1e-6)


def test_distill_command_writes_a_loadable_teacher(tmp_path):
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    import vad_efficientad
    from vad_efficientad.distill import load_teacher

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test root."""

    vad_efficientad.vad_register_commands(app)

    folder = tmp_path / "images" / "class"
    folder.mkdir(parents=True)
    for i, sample in enumerate(make_tiny_splits().train[:4]):
        Image.fromarray(sample.load_image()).save(folder / f"{i}.png")
    output = tmp_path / "teacher.safetensors"
    arguments = ["efficientad", "distill", "--images", str(tmp_path / "images"), "--output", str(output), "--image-size", "64", "--steps", "3", "--batch-size", "2", "--model-size", "medium"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    state = load_teacher(output, "medium")
    assert state["0.weight"].shape == (256, 3, 4, 4)
    with pytest.raises(VadError, match="medium teacher"):
        load_teacher(output, "small")
    detector = EfficientAd(**{**SMALL, "model_size": "medium", "teacher_weights": str(output)})
    detector.fit([tiny_image_batch(detector)])
    torch.testing.assert_close(detector.networks["model"].teacher.state_dict()["0.weight"], state["0.weight"])
    for bad, words in ((["--model-size", "large"], "model_size must be one of 'small', 'medium'"), (["--steps", "0"], "steps must be an integer, >= 1"), (["--image-size", "48"], "image_size must be")):
        refused = CliRunner().invoke(app, [*arguments[:4], "--output", str(tmp_path / "other.safetensors"), *bad])
        assert isinstance(refused.exception, VadError) and words in str(refused.exception)
        assert not (tmp_path / "other.safetensors").exists()


def test_official_teacher_state_dicts_load(tmp_path):
    from vad_efficientad.distill import load_teacher
    from vad_efficientad.network import pdn

    official = pdn("small", padding=True).state_dict()  # the official files are torch.save(state_dict)
    torch.save(official, tmp_path / "teacher_small.pth")
    state = load_teacher(tmp_path / "teacher_small.pth", "small")
    assert state.keys() == official.keys()
    with pytest.raises(VadError, match="not a PDN-M teacher"):
        load_teacher(tmp_path / "teacher_small.pth", "medium")


def test_penalty_images_from_a_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "generic"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.jpg")
    detector = EfficientAd(**{**SMALL, "penalty_images": str(folder), "max_steps": 2})
    parts = []
    original = detector.training_step
    detector.training_step = lambda batch, generator: (lambda r: (parts.append(r[1]), r)[1])(original(batch, generator))
    detector.fit([tiny_image_batch(detector)])
    assert all("penalty" in p and p["penalty"] >= 0 for p in parts) and len(parts) == 2


@pytest.mark.parametrize(
    "options",
    [{"image_size": 100}, {"image_size": 32}, {"model_size": "large"}, {"max_steps": 0}, {"lr": 0.0}, {"lr_drop": 1.5},
     {"validation_fraction": 1.0}, {"distill_steps": -1}, {"epochs": None, "max_steps": None}, {"seed": "zero"}],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        EfficientAd(**{**SMALL, **options})


def test_bad_inputs_and_files_are_clear_errors(fitted, tmp_path):
    with pytest.raises(VadError, match="before predict"):
        EfficientAd(**SMALL).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(VadError, match="64 x 64"):
        fitted.predict(torch.rand(1, 3, 96, 96))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 64, 64))
    with pytest.raises(VadError, match="empty"):
        EfficientAd(**SMALL).fit([])
    with pytest.raises(VadError, match="does not exist"):
        EfficientAd(**{**SMALL, "teacher_weights": str(tmp_path / "none.safetensors")}).fit([tiny_image_batch(fitted)])
    with pytest.raises(VadError, match="does not exist"):
        EfficientAd(**{**SMALL, "penalty_images": str(tmp_path / "nowhere")}).fit([tiny_image_batch(fitted)])
    (tmp_path / "junk.pth").write_bytes(b"not a file")
    with pytest.raises(VadError, match="cannot read"):
        EfficientAd(**{**SMALL, "teacher_weights": str(tmp_path / "junk.pth")}).fit([tiny_image_batch(fitted)])
    with pytest.raises(VadError, match="do not fit"):
        EfficientAd(**SMALL).load_state(State(fitted.state().meta, {}))



def test_a_resumed_fit_reuses_the_checkpointed_teacher(tmp_path, monkeypatch):
    import vad_efficientad.detector as module
    from vad.training import session

    options = {**SMALL, "max_steps": None, "epochs": 3}
    train = tiny_image_batch(EfficientAd(**options))
    straight = EfficientAd(**options)
    straight.fit([train])
    calls = []
    real = module.distill_teacher
    monkeypatch.setattr(module, "distill_teacher", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    interrupted = EfficientAd(**options)
    step, taken = interrupted.training_step, []

    def interrupt_in_the_second_epoch(*args):
        taken.append(1)
        if len(taken) > 8:  # 7 steps per epoch
            raise KeyboardInterrupt
        return step(*args)

    interrupted.training_step = interrupt_in_the_second_epoch
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit([train])
    resumed = EfficientAd(**options)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([train])
    assert len(calls) == 1  # the resumed fit did not distil again
    assert resumed.teacher_facts["source"].startswith("checkpoint")
    for name, value in straight.state().tensors.items():
        assert torch.allclose(value, resumed.state().tensors[name], atol=1e-6), name
