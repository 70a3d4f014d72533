"""CFLOW-AD as a vad detector: contract, encoder, fiber steps, statistics, resume, features, CLI, errors."""

import csv
import json

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import make_tiny_splits, single_torch_thread, tiny_image_batch
from vad_cflow.detector import Cflow, CflowFeatures
from vad_cflow.network import summed_probabilities

#: EfficientNet-Lite0 (packaged weights) at 64 px: levels of 8x8, 4x4 and 2x2 positions.
SMALL = {"image_size": 64, "epochs": 2, "batch_size": 4, "fiber_batch_size": 64, "permute_soft": False, "seed": 0}
#: One shallow level: the cheapest fit, for tests about the loop rather than the levels.
ONE_LEVEL = {**SMALL, "layers": ["blocks.2"], "epochs": 1}


@pytest.fixture(scope="module")
def fitted():
    """CFLOW-AD on EfficientNet-Lite0, fitted for two epochs on the tiny training images."""
    detector = Cflow(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_the_options_default_to_the_official_hyper_parameters():
    options = Cflow().options
    assert (options.epochs, options.sub_epochs, options.warmup_meta_epochs, options.batch_size) == (200, 8, 2, 32)
    assert (options.lr, options.fiber_batch_size, options.image_size, options.rotation) == (2e-4, 256, 256, 5.0)
    assert (options.condition_vec, options.coupling_blocks, options.clamp_alpha, options.permute_soft) == (128, 8, 1.9, True)
    assert options.encoder == "tf_efficientnet_lite0" and options.pretrained  # deviation: no offline wide_resnet50_2
    assert not Cflow.allows_mixed_precision


def test_default_levels_are_the_official_strides():
    detector = Cflow(image_size=64)
    assert [(level.name, level.stride, level.channels) for level in detector.levels] == [("blocks.2", 8, 40), ("blocks.4", 16, 112), ("blocks.6", 32, 320)]
    assert detector.hparams["layers"] == ["blocks.2", "blocks.4", "blocks.6"]  # resolved and saved
    assert detector.preprocessing.size == (64, 64) and detector.preprocessing.mean == detector.encoder.preprocessing.mean
    resnet = Cflow(encoder="resnet18", pretrained=False)
    assert [level.name for level in resnet.levels] == ["layer2", "layer3", "layer4"]  # official pool layers
    assert resnet.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))


def test_fit_predicts_maps_normalised_on_the_training_images(fitted):
    train = tiny_image_batch(fitted)
    decoders = fitted.networks["decoders"]
    assert fitted.epochs_trained == 2 and len(fitted.history) == 2
    with torch.no_grad():
        log_ps = [log_p for _, log_p in decoders.decode(fitted.encode(train))]
    torch.testing.assert_close(decoders.log_likelihood_max, torch.stack([log_p.max() for log_p in log_ps]))
    expected_max = summed_probabilities(log_ps, decoders.log_likelihood_max, (64, 64)).max()
    torch.testing.assert_close(decoders.probability_max, expected_max)
    on_train = fitted.predict(train)
    assert on_train.maps.min().item() == pytest.approx(0.0, abs=1e-6)  # the training maps start at 0
    test = tiny_image_batch(fitted, "test")
    prediction = fitted.predict(test)
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 64, 64)
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))
    # an image's score does not depend on its batch (the statistics are fixed, not the batch's)
    alone = torch.cat([fitted.predict(test[i : i + 1]).scores for i in range(3)])
    torch.testing.assert_close(alone, prediction.scores[:3])
    labels = torch.tensor([s.label for s in make_tiny_splits().test], dtype=torch.bool)
    assert prediction.scores[labels].min() > prediction.scores[~labels].max()  # red squares are unlikely


def test_training_takes_one_step_per_fiber_batch():
    detector = Cflow(**SMALL)
    images = tiny_image_batch(detector)[:4]
    detector.networks = detector.build(detector.describe_input(images))
    detector._batches_per_epoch = 2
    (optimizer,), (schedule,) = detector.optimizers()
    loss, parts = detector.training_step(images, torch.Generator().manual_seed(0))
    assert detector.steps_itself
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)  # first warm-up batch: lr / 10
    decoders = detector.networks["decoders"].decoders

    def steps(level):
        parameter = next(p for p in decoders[level].parameters() if p.requires_grad)
        return int(optimizer.state[parameter]["step"]) if parameter in optimizer.state else 0

    # 4 images: 256, 64 and 16 fibers; fiber batches of 64: 4 + 1 + 1 Adam steps, each on its level
    assert [steps(level) for level in range(3)] == [4, 1, 1]
    assert loss.item() != pytest.approx(parts["last_fiber_batch"])  # the value: the mean over every fiber
    assert not loss.requires_grad  # the loop only records it


def test_the_encoder_is_frozen_and_not_saved(fitted):
    detector = Cflow(**ONE_LEVEL)
    before = {k: v.clone() for k, v in detector.encoder.model.state_dict().items()}
    detector.fit([tiny_image_batch(detector)])
    encoder = detector.encoder.model
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # BN statistics too
    assert {key.split("/")[0] for key in fitted.state().tensors} == {"decoders"}


def test_training_rotation_is_nearest_neighbour_with_black_fill():
    detector = Cflow(image_size=64)
    mean, std = torch.tensor(detector.preprocessing.mean).view(1, 3, 1, 1), torch.tensor(detector.preprocessing.std).view(1, 3, 1, 1)
    white = (torch.ones(4, 3, 64, 64) - mean) / std
    rotated = detector.augment(white, torch.Generator().manual_seed(0)) * std + mean
    values = set(torch.round(rotated, decimals=4).unique().tolist())
    assert values == {0.0, 1.0}  # nearest neighbour: no blended pixels; black where the image rotated away
    black = torch.round(rotated, decimals=4) == 0
    assert black.any() and not black[:, :, 4:-4, 4:-4].any()  # 5 degrees move a 64 px image's border by < 4 px
    assert len({int(b.sum()) for b in black}) == 4  # one angle per image
    still = Cflow(image_size=64, rotation=0).augment(white, torch.Generator().manual_seed(0))
    assert torch.equal(still, white)


def test_same_seed_same_training_and_resume_reaches_the_same_weights(tmp_path):
    from vad.training import session

    options = {**ONE_LEVEL, "epochs": 2}
    images = tiny_image_batch(Cflow(**options))
    uninterrupted = Cflow(**options)
    uninterrupted.fit([images])
    # another fit of the same seed writes a checkpoint after epoch 1 (warm-up: the rate changes
    # every batch); a fit resumed from it must reach the uninterrupted fit's weights
    with session(tmp_path, resume=False, every_minutes=0):
        Cflow(**options).fit([images])
    assert (tmp_path / "checkpoint.safetensors").is_file()
    resumed = Cflow(**options)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images])
    assert resumed.history[0] == uninterrupted.history[0] and resumed.epochs_trained == 2
    reference = uninterrupted.state().tensors
    assert all(torch.equal(tensor, resumed.state().tensors[name]) for name, tensor in reference.items())


def test_state_round_trip_gives_the_same_scores(fitted):
    state = fitted.state()
    rebuilt = Cflow(**json.loads(json.dumps(fitted.hparams)))
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    test = tiny_image_batch(fitted, "test")
    first, second = fitted.predict(test), rebuilt.predict(test)
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)


def test_soft_permutations_are_saved_and_restored():
    detector = Cflow(**{**ONE_LEVEL, "permute_soft": True})
    images = tiny_image_batch(detector)
    detector.networks = detector.build(detector.describe_input(images))
    detector.fit_statistics(images)
    saved = detector.state()
    rotation = saved.tensors["decoders/decoders.0.module_list.0.w_perm"].view(40, 40)
    assert ((rotation.abs() > 1e-3) & (rotation.abs() < 0.999)).any()  # a rotation, not a permutation
    loaded = Cflow(**detector.hparams)
    loaded.load_state(saved)
    assert all(torch.equal(value, saved.tensors[f"decoders/{key}"]) for key, value in loaded.networks["decoders"].state_dict().items())


def test_feature_source_cut_points_and_rebuild(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    latents = source(images)
    assert latents.shape == (2, 40 + 112 + 320, 8, 8) and source.out_channels == 472
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    with torch.no_grad():
        decoded = fitted.networks["decoders"].decode(fitted.encode(images))
    torch.testing.assert_close(latents[:, :40], decoded[0][0])
    likelihoods = fitted.feature_source(layers=["blocks.4"], output="log_likelihood")
    assert likelihoods.out_channels == 1
    torch.testing.assert_close(likelihoods(images)[:, 0], decoded[1][1])
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "cflow"
    hparams = dict(config["hparams"])
    rebuilt = Cflow(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, CflowFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), latents)


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app
    from vad.model import AnomalyModel

    output = tmp_path / "run"
    options = ["image_size=64", "epochs=1", "batch_size=4", "fiber_batch_size=64", "layers=[blocks.2,blocks.4]"]
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "cflow", "--device", "cpu", "--no-report", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"cflow.{option}")])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "cflow" and saved["hparams"]["layers"] == ["blocks.2", "blocks.4"] and saved["meta"]["epochs_trained"] == 1
    model = AnomalyModel.load(output / "tiny-a" / "model")
    with open(output / "tiny-a" / "scores.csv") as handle:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    again = {o.sample.path: o.score for o in model.predict(make_tiny_splits("tiny-a", seed=0).test)}
    np.testing.assert_allclose([again[path] for path in scores], list(scores.values()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 16},
        {"epochs": 0},
        {"sub_epochs": 0},
        {"warmup_meta_epochs": -1},
        {"batch_size": 0},
        {"fiber_batch_size": 0},
        {"lr": 0},
        {"condition_vec": 126},
        {"coupling_blocks": 0},
        {"clamp_alpha": 0},
        {"rotation": -1},
        {"layers": []},
        {"layers": ["blocks.2", "blocks.2"]},
        {"permute_soft": "yes please"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Cflow(**{**SMALL, **options})


def test_bad_encoders_layers_and_batches_are_clear_errors(fitted):
    with pytest.raises(VadError, match="unknown backbone 'resnet_18'"):
        Cflow(encoder="resnet_18").levels
    with pytest.raises(VadError, match="has no layer"):
        Cflow(layers=["blocks.2", "nope"]).levels
    with pytest.raises(VadError, match="same level twice"):
        Cflow(layers=["blocks.2", "2"]).levels
    with pytest.raises(VadError, match="before predict"):
        Cflow(**SMALL).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 64, 64))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(2, 1, 64, 64))
    with pytest.raises(VadError, match="empty"):
        Cflow(**SMALL).fit([])
    with pytest.raises(VadError, match="different shapes"):
        Cflow(**SMALL).fit([torch.rand(2, 3, 64, 64), torch.rand(2, 3, 32, 32)])
    with pytest.raises(VadError, match="not among the detector's layers"):
        fitted.feature_source(layers=["blocks.1"])(torch.rand(1, 3, 64, 64))


def test_a_state_for_another_encoder_is_refused_and_changes_nothing(fitted):
    other = Cflow(**{**SMALL, "encoder": "resnet18", "pretrained": False})
    with pytest.raises(VadError, match="trained on encoder levels with"):
        other.load_state(fitted.state())
    assert not other.fitted
    with pytest.raises(VadError, match="do not fit"):
        Cflow(**{**SMALL, "coupling_blocks": 2}).load_state(fitted.state())
    images = torch.rand(2, 3, 64, 64)
    before = fitted.predict(images).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State(fitted.state().meta, {}))
    torch.testing.assert_close(fitted.predict(images).scores, before, rtol=0, atol=0)
