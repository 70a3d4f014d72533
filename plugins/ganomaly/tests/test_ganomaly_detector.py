"""GANomaly as a vad detector: contract, ONNX, per-image scores, features, `vad run`, bad input."""

import csv
import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import single_torch_thread, tiny_image_batch
from vad_ganomaly.detector import Ganomaly, GanomalyFeatures
from vad_ganomaly.network import latent_distance

SMALL = {"image_size": 16, "nz": 6, "ngf": 4, "ndf": 4, "epochs": 1, "batch_size": 4, "seed": 0}


@pytest.fixture(scope="module")
def fitted():
    """GANomaly fitted for one epoch (two steps) on the tiny data set's 16 px images."""
    detector = Ganomaly(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector


@pytest.fixture(scope="module")
def test_images(fitted):
    return tiny_image_batch(fitted, "test")



def test_the_options_default_to_the_official_hyper_parameters():
    options = Ganomaly().options
    assert (options.image_size, options.nz, options.ngf, options.ndf, options.extra_layers) == (32, 100, 64, 64, 0)
    assert (options.epochs, options.batch_size, options.lr, options.beta1, options.beta2) == (15, 64, 2e-4, 0.5, 0.999)
    assert (options.w_adv, options.w_con, options.w_enc, options.reinit_below) == (1.0, 50.0, 1.0, 1e-5)
    preprocessing = Ganomaly().preprocessing
    assert preprocessing.size == (32, 32) and preprocessing.mean == preprocessing.std == (0.5, 0.5, 0.5)  # images in [-1, 1]
    assert not Ganomaly.produces_maps and not Ganomaly.allows_mixed_precision


def test_scores_are_each_images_own_latent_distance(fitted, test_images):
    prediction = fitted.predict(test_images)
    assert prediction.maps is None and prediction.scores.shape == (len(test_images),)
    with torch.no_grad():
        _, latent_i, latent_o = fitted.networks["generator"].eval()(test_images)
    torch.testing.assert_close(prediction.scores, latent_distance(latent_i, latent_o))
    alone = torch.cat([fitted.predict(test_images[i : i + 1]).scores for i in range(3)])
    torch.testing.assert_close(alone, prediction.scores[:3])  # eval mode: no dependence on the batch
    assert fitted.epochs_trained == 1 and len(fitted.history) == 1


def test_feature_source_is_the_first_encoder_before_its_latent_convolution(fitted, test_images):
    source = fitted.feature_source()
    features = source(test_images[:2])
    assert isinstance(source, GanomalyFeatures) and source.out_channels == 8 and features.shape == (2, 8, 4, 4)
    generator = fitted.networks["generator"]
    with torch.no_grad():
        latent = generator.encoder1.main[-1](features)
        torch.testing.assert_close(latent, generator.encoder1(test_images[:2]))  # the latent convolution of these maps is z
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    assert Ganomaly().feature_source().out_channels == 256  # ngf 64 at 32 px


def test_a_resumed_fit_reaches_the_weights_of_an_uninterrupted_one(tmp_path):
    from vad.training import CHECKPOINT_FILE, session

    images = tiny_image_batch(Ganomaly(**SMALL))[:4]
    options = {**SMALL, "epochs": 2}  # one step per epoch
    straight = Ganomaly(**options)
    straight.fit([images])
    interrupted = Ganomaly(**options)
    step = interrupted.training_step

    def interrupt_in_epoch_two(batch, generator):
        if interrupted.current_epoch == 2:
            raise KeyboardInterrupt
        return step(batch, generator)

    interrupted.training_step = interrupt_in_epoch_two
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit([images])
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not interrupted.fitted
    resumed = Ganomaly(**options)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images])
    for name, tensor in straight.state().tensors.items():  # both networks, so both Adam states came back
        assert torch.equal(tensor, resumed.state().tensors[name]), name
    assert resumed.history == straight.history and resumed.epochs_trained == 2


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "ganomaly", "--device", "cpu", "--no-report",
        "--image-size", "16", "--set", "ganomaly.ngf=4", "--set", "ganomaly.ndf=4", "--set", "ganomaly.nz=6",
        "--set", "ganomaly.batch_size=4", "--set", "ganomaly.epochs=1", "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert "image_auroc" in metrics["categories"]["tiny-a"] and "pixel_auroc" not in metrics["categories"]["tiny-a"]
    assert "image scores only" in metrics["skipped_metrics"]["tiny-a"]["pixel_auroc"]  # image-level: pixel metrics skipped
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "ganomaly" and saved["hparams"]["image_size"] == 16
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(float(row["score"]) >= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [{"image_size": 48}, {"image_size": 8}, {"nz": 0}, {"ngf": 0}, {"extra_layers": -1}, {"epochs": 0}, {"batch_size": 0},
     {"lr": 0}, {"beta1": 1.0}, {"w_con": -1}, {"reinit_below": -1}],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Ganomaly(**{**SMALL, **options})


def test_bad_batches_and_states_are_clear_errors_that_change_nothing(fitted, test_images):
    with pytest.raises(VadError, match="before predict"):
        Ganomaly(**SMALL).predict(test_images)
    with pytest.raises(VadError, match="empty"):
        Ganomaly(**SMALL).fit([])
    with pytest.raises(VadError, match=r"16 x 16 px"):
        fitted.predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(test_images[:, :1])
    with pytest.raises(VadError, match=r"16 x 16 px"):
        fitted.feature_source()(torch.zeros(1, 3, 32, 32))
    before = fitted.predict(test_images[:2]).scores
    other = Ganomaly(**{**SMALL, "image_size": 32})
    with pytest.raises(VadError, match="do not fit its options"):
        other.load_state(fitted.state())
    assert not other.fitted
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State({}, {}))
    torch.testing.assert_close(fitted.predict(test_images[:2]).scores, before, rtol=0, atol=0)
