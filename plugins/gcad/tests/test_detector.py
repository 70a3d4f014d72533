"""GCAD as a vad detector: contract, phase rule, skip schedule, frozen and normalised teacher,
validation statistics, resume, teacher files, features, option errors."""

import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import single_torch_thread, tiny_image_batch
from vad.training import CHECKPOINT_FILE, session
from vad_gcad.detector import Gcad, GcadFeatures, resolve_schedule
from vad_gcad.network import skip_weights
from vad_uninformed_students.teacher import PatchNetwork, descriptor_statistics, save_teachers

#: Random teachers (no backbone to load), 32 px, small U-Nets: well under a second per fit on
#: four images (the dense p = 17 teacher dominates).
SMALL = {"image_size": 32, "patch_sizes": [17], "epochs": 2, "batch_size": 2, "distill_steps": 0, "unet_depth": 2, "unet_width": 3, "seed": 0}


def four_images(detector):
    """The first four tiny training images (validation_fraction 0.1 keeps three for training)."""
    return tiny_image_batch(detector)[:4]


@pytest.fixture(scope="module")
def fitted():
    detector = Gcad(**SMALL)
    with single_torch_thread():
        detector.fit([four_images(detector)])
    return detector



def test_declares_the_thesis_defaults():
    o = Gcad().options
    assert (o.image_size, tuple(o.patch_sizes), o.epochs, o.lr, o.weight_decay) == (256, (17, 33), 500, 1e-4, 1e-5)
    assert (o.bottleneck, o.global_channels, o.skip_decay_epochs, o.global_regressor_start) == (32, 10, 100, 50)
    assert (o.unet_depth, o.unet_width, o.validation_fraction, o.distill_steps) == (5, 6, 0.1, 2000)
    assert (o.rotation, o.color_jitter, o.vertical_flip, o.horizontal_flip) == (3.0, 0.2, False, False)
    assert Gcad().preprocessing.size == (256, 256) and Gcad().preprocessing.mean == (0.485, 0.456, 0.406)


def test_schedule_is_used_as_given_or_scaled_to_the_thesis_shares():
    assert resolve_schedule(500, 100, 50) == {"epochs": 500, "skip_decay_epochs": 100, "global_regressor_start": 50, "scaled": []}
    assert resolve_schedule(120, 100, 50)["scaled"] == []
    scaled = resolve_schedule(40, 100, 50)
    assert (scaled["skip_decay_epochs"], scaled["global_regressor_start"], scaled["scaled"]) == (8, 4, ["skip_decay_epochs", "global_regressor_start"])
    assert resolve_schedule(2, 100, 50)["skip_decay_epochs"] == 0 and resolve_schedule(2, 100, 50)["global_regressor_start"] == 0
    assert resolve_schedule(80, 100, 10) == {"epochs": 80, "skip_decay_epochs": 16, "global_regressor_start": 10, "scaled": ["skip_decay_epochs"]}
    assert resolve_schedule(10, 0, 0)["scaled"] == []


def test_fit_predicts_full_resolution_maps(fitted):
    prediction = fitted.predict(tiny_image_batch(fitted, "test"))
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 32, 32)
    torch.testing.assert_close(prediction.scores, prediction.maps.flatten(1).amax(1))
    assert fitted.teacher_facts == {"source": "random"} and fitted.epochs_trained == 2
    assert fitted.schedule_facts["skip_decay_epochs"] == 0 and fitted.schedule_facts["global_regressor_start"] == 0


def _fit_recording(options):
    """Fit, recording before every step the epoch, whether R_glo has gradients from the previous
    step, and R_glo's weights; returns the detector, the records and R_glo's initial weights."""
    detector = Gcad(**options)
    records, initial = [], {}
    original = detector.training_step

    def step(batch, generator):
        branch = detector.networks["model"].branches["p17"]
        regressor = list(branch.global_regressor.parameters())
        if not initial:
            initial.update({i: p.detach().clone() for i, p in enumerate(regressor)})
        loss, parts = original(batch, generator)
        records.append({
            "epoch": detector._schedule.epoch,
            "skips": branch.global_network.skip_weights.tolist(),
            "grad": any(p.grad is not None for p in regressor),
            "weights": [p.detach().clone() for p in regressor],
            "parts": parts,
        })
        return loss, parts

    detector.training_step = step
    detector.fit([four_images(detector)])
    return detector, records, initial


def test_global_regressor_trains_only_from_global_regressor_start():
    # 3 training images in batches of 2: 2 steps per epoch; R_glo joins after 1 of 3 epochs
    detector, records, initial = _fit_recording({**SMALL, "epochs": 3, "global_regressor_start": 1, "skip_decay_epochs": 0})
    assert [r["epoch"] for r in records] == [0, 0, 1, 1, 2, 2]
    for r in records[:3]:  # every step of epoch 0 (and what the first R_glo step sees before its update)
        assert all(torch.equal(w, initial[i]) for i, w in enumerate(r["weights"]))
    assert not any(r["grad"] for r in records[:3])
    assert all("p17.global" not in r["parts"] for r in records[:2]) and all("p17.global" in r["parts"] for r in records[2:])
    assert records[3]["grad"]  # the first R_glo step left gradients
    final = list(detector.networks["model"].branches["p17"].global_regressor.parameters())
    assert not all(torch.equal(p, initial[i]) for i, p in enumerate(final))


def test_skip_weights_follow_the_schedule_each_epoch():
    detector, records, _ = _fit_recording({**SMALL, "epochs": 5, "batch_size": 3, "skip_decay_epochs": 4, "global_regressor_start": 1})
    assert [r["epoch"] for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        assert r["skips"] == pytest.approx(skip_weights(r["epoch"], 4))
    assert records[0]["skips"] == [1.0] * 5 and records[-1]["skips"] == [0.0] * 5
    assert detector.networks["model"].branches["p17"].global_network.skip_weights.tolist() == [0.0] * 5  # scoring: after the last epoch
    assert detector.schedule_facts["scaled"] == []


def test_teacher_is_frozen_with_its_normalisation_folded_in():
    detector = Gcad(**{**SMALL, "validation_fraction": 0.0, "epochs": 1})
    images = four_images(detector)
    detector.fit([images])
    teacher = detector.networks["model"].branches["p17"].teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the same seed builds the same random teacher: fold its statistics by hand
    torch.manual_seed(0)
    fresh = Gcad(**SMALL).build({})["model"].branches["p17"].teacher
    mean, std = descriptor_statistics(fresh, images.split(2))
    last = fresh.convs[-1]
    for key, value in teacher.state_dict().items():
        if key.startswith(f"convs.{len(fresh.convs) - 1}."):
            continue
        assert torch.equal(value, fresh.state_dict()[key]), key  # untouched by training
    torch.testing.assert_close(teacher.convs[-1].weight, last.weight / std.view(-1, 1, 1, 1))
    torch.testing.assert_close(teacher.convs[-1].bias, (last.bias - mean.flatten()) / std.flatten())
    normalised_mean, normalised_std = descriptor_statistics(teacher, images.split(2))
    assert normalised_mean.abs().max() < 1e-3 and (normalised_std - 1).abs().max() < 1e-3
    (optimizer,), (schedule,) = detector.optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    assert schedule.epoch == 0


def test_maps_are_standardised_on_held_out_images():
    detector = Gcad(**{**SMALL, "validation_fraction": 0.5, "epochs": 1})
    held = {}
    original = detector._fit_map_statistics
    detector._fit_map_statistics = lambda validation: (held.setdefault("v", validation), original(validation))
    train = four_images(detector)
    detector.fit([train])
    validation = held["v"]
    assert validation.shape[0] == 2  # 4 images, 2 train
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(validation[i], train[order[2 + i]]) for i in range(2))
    branch = detector.networks["model"].branches["p17"].eval()
    with torch.no_grad():
        local, glo = branch.raw_maps(validation)
    assert float(branch.local_mean) == pytest.approx(float(local.mean()), rel=1e-5)
    assert float(branch.local_std) == pytest.approx(float(local.std(unbiased=False)), rel=1e-4)
    assert float(branch.global_mean) == pytest.approx(float(glo.mean()), rel=1e-5)
    assert float(branch.global_std) == pytest.approx(float(glo.std(unbiased=False)), rel=1e-4)
    standardised = (local - branch.local_mean) / branch.local_std
    assert abs(float(standardised.mean())) < 1e-4 and float(standardised.std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    with torch.no_grad():
        _, maps = detector.export_module()(validation)
    assert abs(float(maps.mean())) < 1e-4  # both parts have zero mean on the validation images


def _fake_distillation(monkeypatch, detector):
    """Stand-in for the teachers' distillation (no backbone to load): the detector's own p = 17
    teacher with its weights scaled, and facts."""
    import copy

    import vad_uninformed_students.teacher as teacher_module

    def distil(owner, *args):
        teacher = copy.deepcopy(detector.networks["model"].branches["p17"].teacher)
        with torch.no_grad():
            for parameter in teacher.parameters():
                parameter.mul_(1.5)
        return {17: teacher}, {"source": "distilled", "backbone": "fake", "teachers": {"17": {"steps": 1, "first_loss": 2.0}}}

    monkeypatch.setattr(teacher_module, "distill_teachers", distil)
    return detector


def test_a_resumed_fit_restores_the_schedule_and_skips_the_teacher_set_up(tmp_path, monkeypatch):
    options = {**SMALL, "epochs": 3, "skip_decay_epochs": 2, "global_regressor_start": 2, "distill_steps": 1}
    images = four_images(Gcad(**options))
    straight = _fake_distillation(monkeypatch, Gcad(**options))
    straight.fit([images])

    interrupted = _fake_distillation(monkeypatch, Gcad(**options))
    original, count = interrupted.training_step, {"steps": 0}

    def interrupt(batch, generator):
        count["steps"] += 1
        if count["steps"] == 5:  # first step of epoch 3 (2 steps per epoch), after the checkpoint of epoch 2
            raise KeyboardInterrupt
        return original(batch, generator)

    interrupted.training_step = interrupt
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit([images])
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not interrupted.fitted

    resumed, seen = Gcad(**options), []
    import vad_uninformed_students.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "distill_teachers", lambda *args: pytest.fail("a resumed fit distilled its teachers again"))
    resumed_step = resumed.training_step
    resumed.training_step = lambda batch, generator: (seen.append((resumed._schedule.epoch, resumed.networks["model"].branches["p17"].global_network.skip_weights.tolist())), resumed_step(batch, generator))[1]
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images])
    assert [epoch for epoch, _ in seen] == [2, 2]  # continued after epoch 2, with its schedule: skips 0, R_glo trains
    assert all(skips == [0.0] * 5 for _, skips in seen)
    assert resumed.teacher_facts == straight.teacher_facts and straight.teacher_facts["backbone"] == "fake"  # carried by the checkpoint
    for name, tensor in straight.state().tensors.items():
        assert torch.equal(tensor, resumed.state().tensors[name]), name
    assert resumed.history == straight.history and resumed.schedule_facts == straight.schedule_facts


def test_teachers_load_from_an_uninformed_students_file(tmp_path, fitted):
    torch.manual_seed(3)
    teachers = {17: PatchNetwork(17, slope=0.05), 33: PatchNetwork(33, slope=0.05)}
    save_teachers(tmp_path / "teachers.safetensors", teachers, {p: {"slope": 0.05} for p in teachers}, {"backbone": "test"})
    detector = Gcad(**{**SMALL, "teacher_weights": str(tmp_path / "teachers.safetensors"), "epochs": 1})
    images = four_images(detector)
    detector.fit([images])
    branch = detector.networks["model"].branches["p17"]
    assert detector.teacher_facts == {"source": "file", "file": str(tmp_path / "teachers.safetensors"), "backbone": "test"}
    assert branch.teacher.slope == 0.05 and float(branch.teacher_slope) == 0.05
    assert torch.equal(branch.teacher.convs[0].weight, teachers[17].convs[0].weight)
    reloaded = Gcad(**detector.hparams)
    reloaded.load_state(State(json.loads(json.dumps(detector.state().meta)), detector.state().tensors))
    assert reloaded.networks["model"].branches["p17"].teacher.slope == 0.05  # the slope travels with the model
    test = tiny_image_batch(detector, "test")[::4]
    torch.testing.assert_close(reloaded.predict(test).scores, detector.predict(test).scores)
    save_teachers(tmp_path / "only33.safetensors", {33: teachers[33]}, {33: {}}, {})
    with pytest.raises(VadError, match="no teacher for patch size 17"):
        Gcad(**{**SMALL, "teacher_weights": str(tmp_path / "only33.safetensors")}).fit([images])
    with pytest.raises(VadError, match="does not exist"):
        Gcad(**{**SMALL, "teacher_weights": str(tmp_path / "none.safetensors")}).fit([images])


def test_feature_source_cut_points_and_rebuild(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert features.shape == (2, 10 + 128 + 10, 4, 4) == (2, source.out_channels, *source.grid_size((32, 32)))
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    dense = fitted.feature_source(stride=1)(images)
    branch = fitted.networks["model"].branches["p17"]
    local, glo = branch.raw_maps(images)
    torch.testing.assert_close((dense[:, 10:138] ** 2).sum(1), local)  # the residuals' squared norms are A_loc, A_glo
    torch.testing.assert_close((dense[:, 138:] ** 2).sum(1), glo)
    assert fitted.feature_source(output="global")(images).shape == (2, 10, 4, 4)
    assert fitted.feature_source(output="residual", stride=2).out_channels == 138
    config = json.loads(json.dumps(source.config()))
    hparams = dict(config["hparams"])
    rebuilt = Gcad(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, GcadFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features)


@pytest.mark.parametrize(
    "options",
    [{"image_size": 48}, {"image_size": 16}, {"image_size": 32, "unet_depth": 7}, {"patch_sizes": []}, {"patch_sizes": [17, 17]},
     {"patch_sizes": [21]}, {"bottleneck": 0}, {"global_channels": 0}, {"skip_decay_epochs": -1}, {"global_regressor_start": -1},
     {"validation_fraction": 1.0}, {"rotation": -1.0}, {"color_jitter": 1.0}, {"distill_batch_size": 1}, {"lr": 0.0}, {"epochs": 0}],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError, match="gcad"):
        Gcad(**{**SMALL, **options})


def test_bad_inputs_are_clear_errors(fitted):
    with pytest.raises(VadError, match="before predict"):
        Gcad(**SMALL).predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(VadError, match="32 x 32"):
        fitted.predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(VadError, match="empty"):
        Gcad(**SMALL).fit([])
    with pytest.raises(VadError, match="do not fit"):
        Gcad(**SMALL).load_state(State(fitted.state().meta, {}))


def test_registered_through_the_entry_point():
    from typer.testing import CliRunner

    from vad.cli import app
    from vad.plugins import get_registry

    registry = get_registry()
    assert registry.entries("detectors")["gcad"].plugin.distribution == "vad-gcad"
    assert registry.load_class("detectors", "gcad") is Gcad
    result = CliRunner().invoke(app, ["list", "detectors", "--details"])
    assert result.exit_code == 0 and "gcad" in result.output and "skip_decay_epochs" in result.output
