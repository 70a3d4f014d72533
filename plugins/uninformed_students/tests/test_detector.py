"""Uninformed Students as a vad detector: contract, held-out standardisation, frozen teachers,
teacher files, the distill command, features, option and input errors."""

import json
import subprocess
import sys

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import make_tiny_splits, single_torch_thread, tiny_image_batch
from vad_uninformed_students.detector import UninformedStudents, UninformedStudentsFeatures
from vad_uninformed_students.teacher import PatchNetwork, descriptor_statistics, load_teachers, save_teachers

SMALL = {"image_size": 16, "patch_sizes": [17], "students": 2, "epochs": 1, "seed": 0}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Random p = 17 and p = 33 teachers in a teacher file (no distillation: fast)."""
    path = tmp_path_factory.mktemp("teachers") / "teachers.safetensors"
    torch.manual_seed(0)
    teachers = {p: PatchNetwork(p) for p in (17, 33)}
    save_teachers(path, teachers, {p: {"patch_size": p, "slope": 5e-3, "steps": 0} for p in teachers}, {"backbone": "none"})
    return path


@pytest.fixture(scope="module")
def fitted(teacher_file):
    detector = UninformedStudents(**SMALL, teacher_weights=str(teacher_file), validation_fraction=0.25)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector


def held_out(detector, images):
    """The training and validation images of a fit, as ``fit`` splits them."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(detector.options.seed))
    kept = max(1, int((1 - detector.options.validation_fraction) * len(images)))
    return images[order[:kept]], images[order[kept:]]



def test_declares_the_thesis_defaults():
    options = UninformedStudents().options
    assert (options.image_size, options.patch_sizes, options.students, options.epochs, options.batch_size) == (256, (17, 33, 65), 3, 100, 1)
    assert (options.lr, options.weight_decay, options.slope, options.validation_fraction) == (1e-4, 1e-5, 5e-3, 0.1)
    assert (options.teacher_weights, options.distill_backbone, options.distill_steps, options.distill_batch_size, options.backbone_input) == (None, "tf_efficientnet_lite0", 2000, 64, 64)
    preprocessing = UninformedStudents().preprocessing
    assert preprocessing.size == (256, 256) and preprocessing.mean == (0.485, 0.456, 0.406)


def test_fit_predicts_one_value_per_pixel(fitted):
    prediction = fitted.predict(tiny_image_batch(fitted, "test"))
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 16, 16)
    torch.testing.assert_close(prediction.scores, prediction.maps.flatten(1).amax(1))
    assert fitted.teacher_facts["source"] == "file" and fitted.epochs_trained == 1 and len(fitted.history) == 1


def test_held_out_images_standardise_the_maps_and_the_rest_trains(fitted):
    images = tiny_image_batch(fitted)
    train, validation = held_out(fitted, images)
    assert len(train) == 6 and len(validation) == 2  # validation_fraction 0.25 of 8
    ensemble = fitted.networks["model"].smallest
    with torch.no_grad():
        error, variance = ensemble.normalized_scores(validation)
    for term in (error, variance):  # standardised on exactly these images: mean 0, std 1 per term
        assert abs(float(term.mean())) < 1e-3 and float(term.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    mean, std = descriptor_statistics(ensemble.teacher, [train])  # the teacher statistics: training part only
    torch.testing.assert_close(ensemble.teacher_mean, mean)
    torch.testing.assert_close(ensemble.teacher_std, std)


def test_teachers_stay_frozen_and_only_students_train(fitted, teacher_file):
    model = fitted.networks["model"]
    saved, _ = load_teachers(teacher_file, [17], "test")
    for key, value in model.scale(17).teacher.state_dict().items():
        assert torch.equal(value, saved[17][key]), key
    assert not any(p.requires_grad for p in model.scale(17).teacher.parameters())
    untrained = fitted.build({})["model"]  # the same seed: the students' initial weights
    for student, initial in zip(model.scale(17).students, untrained.scale(17).students):
        assert not torch.equal(student.convs[0].weight, initial.convs[0].weight)
    (optimizer,), schedules = fitted.optimizers()
    assert schedules == [] and optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 1e-5
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.student_parameters()}


def test_random_teachers_are_said_loudly(capsys):
    random = UninformedStudents(**SMALL, distill_steps=0)
    random.fit([tiny_image_batch(random)])
    assert random.teacher_facts == {"source": "random"} and "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_state_round_trip_keeps_scores_and_teacher_facts(fitted):
    state = fitted.state()
    loaded = UninformedStudents(**json.loads(json.dumps(fitted.hparams)))
    loaded.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    test = tiny_image_batch(fitted, "test")[:3]
    torch.testing.assert_close(loaded.predict(test).maps, fitted.predict(test).maps)
    assert loaded.teacher_facts == fitted.teacher_facts


def test_teacher_files_round_trip_and_refuse_clearly(tmp_path, teacher_file):
    from vad.distillation import save_teacher_file

    states, facts = load_teachers(teacher_file, [33, 17], "test")
    assert set(states) == {17, 33} and facts["patch_sizes"] == [17, 33] and facts["backbone"] == "none"
    assert states[33].keys() == PatchNetwork(33).state_dict().keys()
    save_teacher_file(tmp_path / "pdn.safetensors", {"0.weight": torch.zeros(1)}, "vad-efficientad-teacher", {})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    narrow = {17: PatchNetwork(17, out_channels=64)}
    save_teachers(tmp_path / "narrow.safetensors", narrow, {17: {}}, {})
    before = sorted(tmp_path.iterdir())
    cases = [
        ({"teacher_weights": str(tmp_path / "missing.safetensors")}, "does not exist"),
        ({"teacher_weights": str(tmp_path / "pdn.safetensors")}, "not a patch-teacher file"),
        ({"teacher_weights": str(tmp_path / "junk.safetensors")}, "cannot read"),
        ({"teacher_weights": str(teacher_file), "patch_sizes": [17, 65]}, "no teacher for patch size 65"),
        ({"teacher_weights": str(tmp_path / "narrow.safetensors")}, "does not fit"),
        ({"teacher_weights": str(teacher_file), "slope": 0.05}, "slope 0.005"),
    ]
    for options, words in cases:
        detector = UninformedStudents(**{**SMALL, **options})
        with pytest.raises(VadError, match=words):
            detector.fit([tiny_image_batch(detector)])
        assert not detector.fitted
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def _cli():
    """``vad.cli.app`` with this plugin's commands (as ``vad`` adds them)."""
    import vad_uninformed_students
    from vad.cli import app

    if not any(group.name == "uninformed-students" for group in app.registered_groups):
        vad_uninformed_students.vad_register_commands(app)
    return app


def test_distill_command_writes_one_file_for_every_patch_size(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    folder = tmp_path / "images" / "class"
    folder.mkdir(parents=True)
    for i, sample in enumerate(make_tiny_splits().train[:3]):
        Image.fromarray(sample.load_image()).save(folder / f"{i}.png")
    output = tmp_path / "teachers.safetensors"
    base = ["uninformed-students", "distill", "--images", str(tmp_path / "images"), "--output", str(output)]
    tiny = ["--steps", "1", "--batch-size", "2", "--image-size", "32", "--backbone-input", "32"]
    result = CliRunner().invoke(_cli(), ["--quiet", *base, "--patch-size", "17", "--patch-size", "33", *tiny])
    assert result.exit_code == 0, result.output
    states, facts = load_teachers(output, [17, 33], "test")
    assert facts["patch_sizes"] == [17, 33] and facts["backbone"] == "tf_efficientnet_lite0"
    assert facts["teachers"]["33"]["steps"] == 1 and facts["teachers"]["17"]["backbone_input"] == 32
    with pytest.raises(VadError, match="no teacher for patch size 65"):
        load_teachers(output, [65], "test")
    other = tmp_path / "other.safetensors"
    refusals = (
        (["--patch-size", "21"], "patch_sizes must be"),
        (["--steps", "0"], "steps must be an integer, >= 1"),
        (["--batch-size", "1"], "batch_size must be an integer, >= 2"),
        (["--patch-size", "17", "--patch-size", "17"], "without repeats"),
    )
    for bad, words in refusals:
        refused = CliRunner().invoke(_cli(), [*base[:4], "--output", str(other), *tiny, *bad])
        assert isinstance(refused.exception, VadError) and words in str(refused.exception), refused.output
    refused = CliRunner().invoke(_cli(), [*base[:2], "--images", str(tmp_path / "nowhere"), "--output", str(other), *tiny])
    assert isinstance(refused.exception, VadError) and "does not exist" in str(refused.exception)
    assert not other.exists()
    help_text = CliRunner().invoke(_cli(), ["uninformed-students", "distill", "--help"], env={"COLUMNS": "200"}).output
    assert "--patch-size" in help_text and "thesis 50,000" in help_text


def test_features_are_the_regression_residual_of_the_smallest_patch_size(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert isinstance(source, UninformedStudentsFeatures) and features.shape == (2, 128, 16, 16) == (2, source.out_channels, *source.grid_size((16, 16)))
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    ensemble = fitted.networks["model"].smallest
    with torch.no_grad():
        error, _ = ensemble.raw_scores(images)
        targets = ensemble.targets(images)
    torch.testing.assert_close((features**2).sum(1), error, rtol=1e-4, atol=1e-5)  # its squared norm is e
    torch.testing.assert_close(fitted.feature_source(output="teacher")(images), targets)
    pooled = fitted.feature_source(stride=4)
    torch.testing.assert_close(pooled(images), torch.nn.functional.avg_pool2d(features, 4))
    assert pooled.grid_size((16, 16)) == (4, 4)
    config = json.loads(json.dumps(source.config()))
    hparams = dict(config["hparams"])
    rebuilt = UninformedStudents(**hparams.pop("detector")).feature_source(**hparams)
    assert rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features)


def test_features_fuse_through_vad_run(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    output = tmp_path / "run"
    options = ["image_size=16", "patch_sizes=[17]", "students=2", "epochs=1", "distill_steps=0"]
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "patchcore", "--backbone", "detector:uninformed-students", "--device", "cpu", "--no-report", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"uninformed-students.{option}")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1


@pytest.mark.parametrize(
    "options",
    [{"patch_sizes": [21]}, {"patch_sizes": []}, {"patch_sizes": [17, 17]}, {"students": 0}, {"image_size": 8}, {"epochs": 0},
     {"lr": 0.0}, {"slope": 0.0}, {"validation_fraction": 1.0}, {"distill_steps": -1}, {"distill_batch_size": 1}, {"backbone_input": 16}],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        UninformedStudents(**{**SMALL, **options})


def test_bad_inputs_are_clear_errors(fitted):
    with pytest.raises(VadError, match="before predict"):
        UninformedStudents(**SMALL).predict(torch.rand(1, 3, 16, 16))
    with pytest.raises(VadError, match="16 x 16"):
        fitted.predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 16, 16))
    with pytest.raises(VadError, match="empty"):
        UninformedStudents(**SMALL).fit([])
    with pytest.raises(VadError, match="stride 32 exceeds"):
        fitted.feature_source(stride=32)(torch.rand(1, 3, 16, 16))
    with pytest.raises(VadError, match="do not fit"):
        UninformedStudents(**{**SMALL, "students": 3}).load_state(fitted.state())


def test_registered_lazily_through_the_entry_point():
    from vad.plugins import get_registry

    registry = get_registry()
    assert registry.entries("detectors")["uninformed-students"].plugin.distribution == "vad-uninformed-students"
    assert registry.load_class("detectors", "uninformed-students") is UninformedStudents
    code = "import sys, vad_uninformed_students, vad_uninformed_students.cli; print([m for m in ('torch', 'numpy', 'PIL') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_in_fit_distillation_and_a_resumed_fit_reuses_the_checkpointed_teachers(tmp_path, monkeypatch):
    import vad_uninformed_students.teacher as module  # where the detectors' teacher set-up distils
    from vad.training import session

    options = {**SMALL, "epochs": 2, "distill_steps": 1, "distill_batch_size": 4, "backbone_input": 32}
    train = tiny_image_batch(UninformedStudents(**options))[:4]  # 3 training images, 3 steps per epoch
    straight = UninformedStudents(**options)
    straight.fit([train])
    facts = straight.teacher_facts  # distilled in fit
    assert facts["source"] == "distilled" and facts["backbone"] == "tf_efficientnet_lite0"
    assert facts["teachers"]["17"]["steps"] == 1 and facts["teachers"]["17"]["slope"] == 5e-3
    calls = []
    real = module.distill_teachers
    monkeypatch.setattr(module, "distill_teachers", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    interrupted = UninformedStudents(**options)
    step, taken = interrupted.training_step, []

    def interrupt_in_the_second_epoch(*args):
        taken.append(1)
        if len(taken) > 4:
            raise KeyboardInterrupt
        return step(*args)

    interrupted.training_step = interrupt_in_the_second_epoch
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit([train])
    assert not interrupted.fitted
    resumed = UninformedStudents(**options)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([train])
    assert len(calls) == 1  # the resumed fit did not distil again
    assert resumed.teacher_facts["source"].startswith("checkpoint")
    for name, value in straight.state().tensors.items():
        assert torch.allclose(value, resumed.state().tensors[name], atol=1e-6), name
