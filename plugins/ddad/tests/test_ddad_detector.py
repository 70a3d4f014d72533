"""DDAD as a vad detector: contract and ONNX, the two training phases, prediction, features, `vad run`, bad input."""

import csv
import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.plugins import create_backbone
from vad.testing import single_torch_thread, tiny_image_batch
from vad_ddad.detector import Ddad, DdadFeatures
from vad_ddad.network import gaussian_blur, patchify

#: The kit's tiny DDAD (32 px, an 8-channel UNet, 2 DDIM steps) on the default extractor, the packaged EfficientNet-Lite0.
TINY = {**Ddad.tiny_options, "backbone": "tf_efficientnet_lite0", "pretrained": True}


@pytest.fixture(scope="module")
def images():
    """The tiny data set's 8 training images at 32 px in [-1, 1]."""
    return tiny_image_batch(Ddad(**TINY))


@pytest.fixture(scope="module")
def fitted(images):
    """DDAD after one UNet step and one domain-adaptation step, recording the phase and batch size
    of each step and the networks' weights when the adaptation starts."""
    detector = Ddad(**TINY)
    steps = []
    original = detector.training_step

    def recording(batch, generator):
        if detector.adapting and not detector.at_adaptation:
            detector.at_adaptation = {name: {k: v.clone() for k, v in network.state_dict().items()} for name, network in detector.networks.items()}
        steps.append((detector.current_epoch, detector.adapting, batch.shape[0]))
        return original(batch, generator)

    detector.training_step, detector.at_adaptation = recording, {}
    initial = {k: v.clone() for k, v in Ddad(**TINY).build({})["unet"].state_dict().items()}
    with single_torch_thread():
        detector.fit([images[:4], images[4:]])
    detector.steps, detector.initial_unet = steps, initial
    return detector



def test_the_options_default_to_the_official_hyper_parameters():
    options = Ddad().options
    assert (options.image_size, options.epochs, options.batch_size, options.lr, options.weight_decay) == (256, 2000, 32, 3e-4, 0.05)
    assert (options.base_channels, options.heads, options.dropout, options.res_blocks, options.attention_resolutions) == (64, 4, 0.0, 2, (32, 16, 8))
    assert (options.trajectory_steps, options.beta_start, options.beta_end) == (1000, 1e-4, 0.02)
    assert (options.w, options.test_steps, options.skip, options.eta, options.v, options.sigma) == (2.0, 250, 25, 1.0, 1.0, 4.0)
    assert (options.da_epochs, options.da_batch_size, options.da_lr, options.w_da, options.da_steps, options.da_skip, options.da_lambda) == (4, 16, 1e-4, 3.0, 250, 25, 0.1)
    assert options.backbone == "tf_efficientnet_lite0" and options.pretrained  # deviation: wide_resnet101_2 has no offline weights
    detector = Ddad(image_size=64)
    assert (detector.layers, detector.map_layers) == (["blocks.1", "blocks.2", "blocks.4"], ["blocks.2", "blocks.4"])  # strides 4, 8, 16 and 8, 16
    assert detector.hparams["map_layers"] == ["blocks.2", "blocks.4"]  # resolved and saved
    resnet = Ddad(backbone="resnet18", pretrained=False)
    assert (resnet.layers, resnet.map_layers) == (["layer1", "layer2", "layer3"], ["layer2", "layer3"])  # the official levels (WideResNet's names)
    assert detector.preprocessing.mean == (0.5, 0.5, 0.5) and detector.preprocessing.std == (0.5, 0.5, 0.5)  # images in [-1, 1]


def test_the_phases_train_the_unet_then_adapt_the_extractor(fitted):
    assert fitted.steps == [(1, False, 8), (2, True, 8)]  # batch_size, then da_batch_size
    assert fitted.epochs_trained == 2 and len(fitted.history) == 2 and fitted.current_epoch == 0
    start = fitted.at_adaptation
    key = "down.1.0.in_layers.2.weight"
    assert not torch.equal(start["unet"][key], fitted.initial_unet[key])  # phase one trained the UNet
    pretrained = create_backbone("tf_efficientnet_lite0").model.state_dict()
    assert all(torch.equal(v, pretrained[k[len("model.") :]]) for k, v in start["extractor"].items())  # ... and left the extractor pretrained
    unet, extractor = fitted.networks["unet"].state_dict(), fitted.networks["extractor"].state_dict()
    assert all(torch.equal(unet[k], v) for k, v in start["unet"].items())  # the adaptation leaves the UNet as it was
    assert not torch.equal(extractor["model.conv_stem.weight"], start["extractor"]["model.conv_stem.weight"])  # ... and adapts the extractor
    assert not torch.equal(extractor["model.bn1.running_mean"], start["extractor"]["model.bn1.running_mean"])  # in train mode, as official


def test_prediction_is_deterministic_per_image_and_scores_the_blurred_map(fitted, images):
    prediction = fitted.predict(images[:3])
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 32, 32) and bool((prediction.maps >= 0).all())
    torch.testing.assert_close(prediction.scores, gaussian_blur(prediction.maps, 4.0).amax(dim=(1, 2)))
    alone = torch.cat([fitted.predict(images[i : i + 1]).scores for i in (2, 0)])
    torch.testing.assert_close(alone, prediction.scores[[2, 0]])  # an image's score depends on that image only
    other_noise = Ddad(**{**TINY, "seed": 1})
    other_noise.load_state(fitted.state())
    assert not torch.allclose(other_noise.predict(images[:3]).scores, prediction.scores)  # the noise comes from seed


def test_feature_source_is_the_adapted_extractors_patch_features(fitted, images):
    source = fitted.feature_source()
    features = source(images[:2])
    assert source.out_channels == 40 + 112 and features.shape == (2, 152, 4, 4) and not source.requires_fit
    with torch.no_grad():
        levels = fitted.networks["extractor"].eval()(images[:2])
    torch.testing.assert_close(features[:, :40], patchify(levels[fitted.extracted.index("blocks.2")]))
    shallow = fitted.feature_source(layers=["blocks.1"])
    assert shallow.out_channels == 24 and shallow(images[:1]).shape == (1, 24, 8, 8)
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "ddad"
    hparams = dict(config["hparams"])
    assert isinstance(Ddad(**hparams.pop("detector")).feature_source(**hparams), DdadFeatures)
    with pytest.raises(VadError, match="not among the extractor's levels"):
        fitted.feature_source(layers=["blocks.6"])(images[:1])


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    settings = [f"ddad.{key}={json.dumps(value)}" for key, value in Ddad.tiny_options.items() if key != "image_size"]
    arguments = [item for setting in settings for item in ("--set", setting)]
    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "ddad", "--device", "cpu", "--no-report",
        "--image-size", "32", *arguments, "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "ddad" and saved["hparams"]["image_size"] == 32 and saved["meta"]["epochs_trained"] == 2
    assert saved["hparams"]["layers"] == ["layer1", "layer2", "layer3"]
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(float(row["score"]) >= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 48, "channel_mults": None},  # not in the official table
        {"image_size": 36, "channel_mults": [1, 2, 2, 2]},  # not a multiple of 8
        {"norm_groups": 5},
        {"heads": 3},
        {"skip": 30},
        {"da_skip": 7},
        {"test_steps": 1000},
        {"beta_start": 0.02, "beta_end": 0.01},
        {"layers": []},
        {"map_layers": ["layer2", "layer2"]},
        {"attention_resolutions": [16, 16]},
        {"da_batch_size": 1},
        {"dropout": 1.0},
        {"epochs": 0},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Ddad(**{**TINY, **options})


def test_bad_backbones_layers_and_batches_are_clear_errors(fitted, images):
    with pytest.raises(VadError, match="no layer 'layer9'"):
        Ddad(**{**TINY, "backbone": "resnet18", "pretrained": False, "map_layers": ["layer2", "layer9"]}).fit([images])
    unreachable = Ddad(**{**TINY, "backbone": "resnet18"})
    with pytest.raises(VadError, match="hub is unreachable"):  # ResNets' weights do not ship offline
        unreachable.fit([images])
    assert not unreachable.fitted  # nothing half-built
    with pytest.raises(VadError, match="before predict"):
        Ddad(**TINY).predict(images)
    with pytest.raises(VadError, match="32 x 32 px"):
        fitted.predict(torch.zeros(1, 3, 64, 64))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match="empty"):
        Ddad(**TINY).fit([])


def test_mismatched_state_is_refused_and_changes_nothing(fitted, images):
    other = Ddad(**{**TINY, "base_channels": 16})
    with pytest.raises(VadError, match="do not fit its options"):
        other.load_state(fitted.state())
    assert not other.fitted
    before = fitted.predict(images[:2]).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State({}, {}))
    torch.testing.assert_close(fitted.predict(images[:2]).scores, before, rtol=0, atol=0)
