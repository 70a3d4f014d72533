"""FastFlow as a vad detector: contract, levels, frozen backbone, training, state, features, CLI, errors."""

import csv
import json

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import single_torch_thread, tiny_image_batch
from vad_fastflow.detector import FastFlow, FastFlowFeatures

SMALL = {"image_size": 64, "epochs": 2, "batch_size": 4, "seed": 0}
RANDOM_RESNET = {"backbone": "resnet18", "pretrained": False, "image_size": 32, "epochs": 1, "batch_size": 4, "flow_steps": 2}


@pytest.fixture(scope="module")
def fitted():
    """FastFlow on EfficientNet-Lite0, fitted for two epochs on the tiny images."""
    detector = FastFlow(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_the_options_default_to_the_papers_hyper_parameters():
    options = FastFlow().options
    assert (options.epochs, options.batch_size, options.image_size) == (500, 32, 256)
    assert (options.lr, options.weight_decay) == (1e-3, 1e-5)
    assert (options.flow_steps, options.hidden_ratio, options.clamp) == (8, 1.0, 2.0)
    assert options.backbone == "tf_efficientnet_lite0" and options.pretrained  # deviation: resnet18 has no offline weights


def test_kernels_follow_the_reference_config_of_the_backbone():
    assert FastFlow().options.conv3x3_only is False  # alternating 3x3 / 1x1, as the paper
    assert FastFlow(backbone="resnet18").options.conv3x3_only is True  # the reference's resnet18.yaml
    assert FastFlow(backbone="timm:resnet18.a1_in1k").hparams["conv3x3_only"] is True  # resolved and saved
    assert FastFlow(backbone="wide_resnet50_2").options.conv3x3_only is False
    assert FastFlow(backbone="resnet18", conv3x3_only=False).options.conv3x3_only is False


def test_default_levels_are_the_papers_strides():
    detector = FastFlow(image_size=64)
    assert [(level.name, level.stride, level.channels) for level in detector.levels] == [("blocks.1", 4, 24), ("blocks.2", 8, 40), ("blocks.4", 16, 112)]
    assert detector.hparams["layers"] == ["blocks.1", "blocks.2", "blocks.4"]  # saved resolved
    assert detector.level_shapes() == [[24, 16, 16], [40, 8, 8], [112, 4, 4]]
    resnet = FastFlow(**RANDOM_RESNET)
    assert [level.name for level in resnet.levels] == ["layer1", "layer2", "layer3"]  # the reference's out_indices=[1, 2, 3]
    assert resnet.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))  # ImageNet, as the reference
    assert FastFlow(**{**RANDOM_RESNET, "layers": ["2", "layer3"]}).levels[0].name == "layer2"  # positions work


def test_the_backbone_is_frozen_and_only_the_head_trains():
    detector = FastFlow(**SMALL)
    before = {k: v.clone() for k, v in detector.backbone.model.state_dict().items()}
    detector.fit([tiny_image_batch(detector)])
    backbone = detector.backbone.model
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())  # BatchNorm statistics too
    (optimizer,), schedules = detector.optimizers()
    assert schedules == [] and optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-5
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in detector.networks["head"].parameters()}
    assert {key.split("/")[1].split(".")[0] for key in detector.state().tensors} == {"norms", "flows"}


def test_the_training_loss_is_the_summed_per_scale_likelihood(fitted):
    images = tiny_image_batch(fitted)[:3]
    generator = torch.Generator()
    fitted.networks["head"].requires_grad_(True)  # a fitted detector's networks are frozen
    try:
        loss = fitted.training_step(images, generator)
    finally:
        fitted.networks["head"].requires_grad_(False)
    features = fitted.encode(images)
    head = fitted.networks["head"]
    expected = 0.0
    for norm, flow, feature in zip(head.norms, head.flows, features):
        z, log_jac_det = flow(norm(feature))
        expected = expected + torch.mean(0.5 * torch.sum(z**2, dim=(1, 2, 3)) - log_jac_det)
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad


def test_fit_lowers_the_loss_and_predicts_maps_at_the_input_size(fitted):
    assert fitted.epochs_trained == 2 and len(fitted.history) == 2
    prediction = fitted.predict(tiny_image_batch(fitted, "test"))
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 64, 64)
    assert bool((prediction.maps >= -1).all()) and bool((prediction.maps <= 0).all())
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))
    assert fitted.history[-1] < fitted.history[0]


def test_state_round_trip_gives_the_same_scores(fitted):
    images = tiny_image_batch(fitted, "test")
    state = fitted.state()
    assert state.meta["input"] == {"layers": ["blocks.1", "blocks.2", "blocks.4"], "shapes": [[24, 16, 16], [40, 8, 8], [112, 4, 4]]}
    rebuilt = FastFlow(**fitted.hparams)
    rebuilt.load_state(State(json.loads(json.dumps(state.meta)), state.tensors))
    first, second = fitted.predict(images), rebuilt.predict(images)
    torch.testing.assert_close(second.scores, first.scores, rtol=0, atol=0)
    torch.testing.assert_close(second.maps, first.maps, rtol=0, atol=0)


def test_same_seed_same_training():
    first, second = FastFlow(**RANDOM_RESNET), FastFlow(**RANDOM_RESNET)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first.fit([images])
    second.fit([images])
    saved = second.state().tensors
    assert all(torch.equal(tensor, saved[name]) for name, tensor in first.state().tensors.items())
    other = FastFlow(**{**RANDOM_RESNET, "seed": 1})
    other.fit([images])
    assert any(not torch.equal(tensor, saved[name]) for name, tensor in other.state().tensors.items())


def test_feature_source_is_the_latent_maps(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert source.out_channels == 24 + 40 + 112 and features.shape == (2, 176, 16, 16)
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    latents, _ = fitted.networks["head"].latents(fitted.encode(images))
    torch.testing.assert_close(features[:, :24], latents[0])  # the first level's latent map itself
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "fastflow"
    hparams = dict(config["hparams"])
    rebuilt = FastFlow(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, FastFlowFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features, rtol=0, atol=0)
    deep = fitted.feature_source(layers=["blocks.4"])(images)
    assert deep.shape == (2, 112, 4, 4)
    torch.testing.assert_close(deep, latents[2])


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "fastflow", "--device", "cpu", "--no-report",
        "--image-size", "32", "--set", "fastflow.epochs=2", "--set", "fastflow.flow_steps=2", "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "fastflow" and saved["hparams"]["image_size"] == 32 and saved["hparams"]["conv3x3_only"] is False
    assert saved["hparams"]["layers"] == ["blocks.1", "blocks.2", "blocks.4"] and saved["meta"]["epochs_trained"] == 2
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(-1 <= float(row["score"]) <= 0 for row in rows)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 16},
        {"epochs": 0},
        {"batch_size": 0},
        {"flow_steps": 0},
        {"hidden_ratio": 0},
        {"clamp": 0},
        {"lr": 0},
        {"weight_decay": -1},
        {"layers": []},
        {"layers": ["layer1", "layer1"]},
        {"conv3x3_only": "sometimes"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        FastFlow(**{**RANDOM_RESNET, **options})


def test_bad_backbones_layers_and_batches_are_clear_errors(fitted):
    images = tiny_image_batch(fitted)
    with pytest.raises(VadError, match="unknown backbone 'resnet_eighteen'"):
        FastFlow(**{**RANDOM_RESNET, "backbone": "resnet_eighteen"}).fit([images])
    with pytest.raises(VadError, match="no layer 'layer9'"):
        FastFlow(**{**RANDOM_RESNET, "layers": ["layer1", "layer9"]}).fit([images])
    with pytest.raises(VadError, match="same level twice"):
        FastFlow(**{**RANDOM_RESNET, "layers": ["1", "layer1"]}).fit([images])
    with pytest.raises(VadError, match="hub is unreachable"):  # resnet18 weights do not ship offline
        FastFlow(**{**RANDOM_RESNET, "pretrained": True}).fit([images])
    with pytest.raises(VadError, match="before predict"):
        FastFlow(**SMALL).predict(images)
    with pytest.raises(VadError, match="empty"):
        FastFlow(**SMALL).fit([])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[:, :1])
    with pytest.raises(VadError, match="64 x 64"):  # the LayerNorms are built for image_size
        fitted.predict(images[:, :, :32, :32])
    with pytest.raises(VadError, match="not among the detector's levels"):
        fitted.feature_source(layers=["blocks.3"])(images[:1])


def test_mismatched_state_is_refused_and_changes_nothing(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    for options in ({"image_size": 96}, {"layers": ["blocks.2", "blocks.4"]}):
        other = FastFlow(**{**SMALL, **options})
        with pytest.raises(VadError, match="load it with the options it was trained with"):
            other.load_state(fitted.state())
        assert not other.fitted
    before = fitted.predict(images).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State(fitted.state().meta, {}))
    torch.testing.assert_close(fitted.predict(images).scores, before, rtol=0, atol=0)
