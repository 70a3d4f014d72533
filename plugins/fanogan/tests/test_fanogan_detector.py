"""f-AnoGAN as a vad detector: contract, patches, phases, resume, scoring, features, CLI, bad input."""

import copy
import csv
import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import check_state_refused, single_torch_thread, tiny_image_batch
from vad_fanogan.detector import FAnoGan, FAnoGanFeatures
from vad_fanogan.network import grey_levels, izif_residual, to_model_range

#: 128 px images (four 64 px patches), four training patches: one batch per epoch; two GAN epochs
#: (a generator step before the second critic step, with critic_iterations 1), one encoder epoch.
SMALL = {"image_size": 128, "patches": 4, "epochs": 2, "encoder_epochs": 1, "batch_size": 4, "latent_dim": 8, "width": 2, "critic_iterations": 1, "seed": 0}


@pytest.fixture(scope="module")
def images():
    """The tiny data set's training images at 128 px."""
    return tiny_image_batch(FAnoGan(**SMALL))


@pytest.fixture(scope="module")
def fitted(images):
    """A fitted f-AnoGAN with its optimiser steps recorded as ``(epoch, network)``, and the
    weights of every network when the encoder's first step came (shared: fitting is slow)."""
    detector = FAnoGan(**SMALL)
    detector.steps, detector.before_encoder = [], {}

    def recording_step(optimizer, loss):
        network = next(name for name, candidate in detector._optimizers.items() if candidate is optimizer)
        if network == "encoder" and not detector.before_encoder:
            detector.before_encoder = copy.deepcopy({name: n.state_dict() for name, n in detector.networks.items()})
        detector.steps.append((detector.current_epoch, network))
        FAnoGan.optimizer_step(detector, optimizer, loss)

    detector.optimizer_step = recording_step
    with single_torch_thread():
        detector.fit([images[:4], images[4:]])
    return detector



def test_the_options_default_to_the_theses_mvtec_setup():
    options = FAnoGan().options
    assert (options.image_size, options.patches, options.stride, options.batch_size) == (256, 50000, 64, 64)
    assert (options.epochs, options.encoder_epochs, options.lr, options.encoder_lr) == (100, 64, 1e-4, 5e-5)
    assert (options.latent_dim, options.width, options.critic_iterations, options.gradient_penalty) == (128, 64, 5, 10.0)
    assert (options.kappa, options.flip_probability, options.image_score) == (1.0, 0.5, "izi_f")
    assert not FAnoGan.allows_mixed_precision and FAnoGan.steps_itself
    assert 64 * -(-50000 // 64) == 50048  # encoder epochs x batches per epoch ~ the official 50,000 iterations


def test_training_patches_are_seeded_crops_of_the_grey_images(images):
    detector = FAnoGan(**{**SMALL, "patches": 6})
    patches = detector.training_patches(images)
    assert patches.shape == (6, 1, 64, 64) and patches.dtype == torch.uint8
    generator = torch.Generator().manual_seed(0)
    which = torch.randint(len(images), (6,), generator=generator)
    tops, lefts = (torch.randint(128 - 64 + 1, (6,), generator=generator) for _ in range(2))
    grey = grey_levels(images)
    for patch, i, top, left in zip(patches, which, tops, lefts):
        crop = grey[i, :, top : top + 64, left : left + 64]
        torch.testing.assert_close(patch.float(), (crop * 255).round(), atol=0, rtol=0)
    whole = FAnoGan(**{**SMALL, "image_size": 64, "patches": None}).training_patches(images[:, :, :64, :64])
    torch.testing.assert_close(whole.float(), (grey[:, :, :64, :64] * 255).round(), atol=0, rtol=0)  # one per image, in order


def test_the_gan_trains_first_then_the_encoder_alone(fitted):
    # one batch per epoch: critic iteration 0 (epoch 1), then a generator step before critic
    # iteration 1 (epoch 2: the count runs across epochs), then the encoder (epoch 3)
    assert fitted.steps == [(1, "critic"), (2, "generator"), (2, "critic"), (3, "encoder")]
    assert fitted.epochs_trained == 3 and len(fitted.history) == 3 and fitted.current_epoch == 0
    initial = FAnoGan(**SMALL).build({})
    after = {name: network.state_dict() for name, network in fitted.networks.items()}
    for name in ("generator", "critic"):  # frozen (and the generator's BatchNorm statistics too)
        assert all(torch.equal(after[name][k], v) for k, v in fitted.before_encoder[name].items()), name
        assert not all(torch.equal(after[name][k], v) for k, v in initial[name].state_dict().items()), name
    weights = [name for name, _ in initial["encoder"].named_parameters()]  # (its first pass moved its BatchNorm statistics)
    assert all(torch.equal(fitted.before_encoder["encoder"][k], initial["encoder"].state_dict()[k]) for k in weights)
    assert not all(torch.equal(after["encoder"][k], initial["encoder"].state_dict()[k]) for k in weights)


def test_resume_continues_the_critic_count_and_reaches_the_same_weights(fitted, images, tmp_path):
    from vad.training import session

    interrupted = FAnoGan(**SMALL)
    step = interrupted.training_step

    def interrupt_in_epoch_two(batch, generator):
        if interrupted.current_epoch == 2:
            raise KeyboardInterrupt
        return step(batch, generator)

    interrupted.training_step = interrupt_in_epoch_two
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit([images[:4], images[4:]])
    assert not interrupted.fitted and (tmp_path / "checkpoint.safetensors").is_file()
    resumed = FAnoGan(**SMALL)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images[:4], images[4:]])
    reference = fitted.state().tensors
    assert all(torch.equal(tensor, resumed.state().tensors[name]) for name, tensor in reference.items())


def _by_hand(detector, images, stride):
    """Maps and izi_f image scores computed patch by patch with the networks."""
    encoder, generator, critic = (detector.networks[name].eval() for name in ("encoder", "generator", "critic"))
    x = to_model_range(images)
    starts = list(range(0, 128 - 64 + 1, stride))
    total, coverage, residuals = torch.zeros_like(x), torch.zeros_like(x), []
    with torch.no_grad():
        for top in starts:
            for left in starts:
                patch = x[..., top : top + 64, left : left + 64]
                reconstruction = generator(encoder(patch))
                residuals.append(izif_residual(patch, reconstruction, critic.features(patch), critic.features(reconstruction), detector.options.kappa))
                total[..., top : top + 64, left : left + 64] += reconstruction
                coverage[..., top : top + 64, left : left + 64] += 1
    return (x - total / coverage).square()[:, 0], torch.stack(residuals).amax(dim=0)


@pytest.mark.parametrize("stride", [64, 32])
def test_maps_are_squared_residuals_and_scores_the_largest_patch_residual(fitted, images, stride):
    detector = FAnoGan(**{**fitted.hparams, "stride": stride})
    detector.load_state(fitted.state())
    prediction = detector.predict(images[:3])
    maps, scores = _by_hand(detector, images[:3], stride)
    assert prediction.maps.shape == (3, 128, 128) and prediction.scores.shape == (3,)
    torch.testing.assert_close(prediction.maps, maps)
    torch.testing.assert_close(prediction.scores, scores)
    tables = FAnoGan(**{**fitted.hparams, "stride": stride, "image_score": "map_max"})
    tables.load_state(fitted.state())
    torch.testing.assert_close(tables.predict(images[:3]).scores, maps.amax(dim=(1, 2)))


def test_state_round_trip_gives_the_same_scores(fitted, images):
    state = fitted.state()
    assert {key.split("/")[0] for key in state.tensors} == {"generator", "critic", "encoder"}
    rebuilt = FAnoGan(**json.loads(json.dumps(fitted.hparams)))
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    first, second = fitted.predict(images[:2]), rebuilt.predict(images[:2])
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)


def test_feature_source_is_the_critics_features_of_the_patches(fitted, images):
    source = fitted.feature_source()
    features = source(images[:2])
    assert source.out_channels == 16 and features.shape == (2, 16, 8, 8)
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    x = to_model_range(images[:2])
    with torch.no_grad():
        critic = fitted.networks["critic"]
        torch.testing.assert_close(features[..., :4, 4:], critic.features(x[..., :64, 64:]))  # top right patch
        torch.testing.assert_close(features[..., 4:, :4], critic.features(x[..., 64:, :64]))  # bottom left patch
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "f-anogan"
    hparams = dict(config["hparams"])
    rebuilt = FAnoGan(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, FAnoGanFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images[:2]), features, rtol=0, atol=0)


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    settings = {"patches": "null", "epochs": 1, "encoder_epochs": 1, "batch_size": 4, "latent_dim": 8, "width": 2}
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "f-anogan", "--device", "cpu", "--no-report",
        "--image-size", "64", *[arg for key, value in settings.items() for arg in ("--set", f"f-anogan.{key}={value}")],
        "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "f-anogan" and saved["hparams"]["image_size"] == 64 and saved["meta"]["epochs_trained"] == 2
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(float(row["score"]) >= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 100},
        {"image_size": 0},
        {"patches": 0},
        {"epochs": 0},
        {"encoder_epochs": 0},
        {"batch_size": 0},
        {"width": 0},
        {"critic_iterations": 0},
        {"gradient_penalty": -1.0},
        {"lr": 0},
        {"kappa": -1.0},
        {"flip_probability": 1.5},
        {"stride": 65},
        {"image_score": "mean"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        FAnoGan(**{**SMALL, **options})


def test_bad_batches_and_order_of_calls(fitted, images):
    with pytest.raises(VadError, match="before predict"):
        FAnoGan(**SMALL).predict(images)
    with pytest.raises(VadError, match="128 x 128"):
        fitted.predict(images[:, :, :64, :64])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.feature_source()(images[:, :1])
    with pytest.raises(VadError, match="empty"):
        FAnoGan(**SMALL).fit([])


def test_mismatched_state_is_refused_and_changes_nothing(fitted, images):
    check_state_refused(fitted, FAnoGan(**{**SMALL, "width": 4}), images[:2], other_match="weights of 'generator' do not fit its options")