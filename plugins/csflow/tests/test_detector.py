"""CS-Flow as a vad detector: backbone and layer, training, scores, state, ONNX, features, CLI, errors."""

import csv
import json

import numpy as np
import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.testing import make_tiny_splits, single_torch_thread, tiny_image_batch
from vad_csflow.detector import CsFlow, CsFlowFeatures
from vad_csflow.network import anomaly_maps, csflow_loss, image_scores

SMALL = {"image_size": 128, "epochs": 2, "batch_size": 4, "hidden_channels": 8, "seed": 0}


@pytest.fixture(scope="module")
def fitted():
    """CS-Flow with an 8-channel flow on EfficientNet-Lite0, fitted for two epochs on the tiny images."""
    detector = CsFlow(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_the_options_default_to_the_official_hyper_parameters():
    options = CsFlow().options
    assert (options.epochs, options.batch_size, options.lr, tuple(options.betas), options.eps, options.weight_decay) == (240, 16, 2e-4, (0.9, 0.999), 1e-4, 1e-5)
    assert (options.max_grad_norm, options.coupling_blocks, options.clamp, options.hidden_channels, options.kernel_sizes) == (1.0, 4, 3.0, 1024, None)
    assert options.map_mode == "official" and options.backbone == "tf_efficientnet_lite0" and options.image_size == 384  # deviations: B5 at 768 px


def test_default_layer_and_grids():
    detector = CsFlow(image_size=128)
    assert (detector.level.name, detector.level.stride, detector.level.channels) == ("blocks.6", 32, 320)
    assert detector.hparams["layer"] == "blocks.6" and detector.grid == (4, 4)  # saved resolved
    assert CsFlow(backbone="resnet18", pretrained=False, image_size=128).level.name == "layer4"
    shallower = CsFlow(layer="blocks.4", image_size=64)  # stride 16: 64 px halves twice to a 1 x 1 grid
    assert shallower.grid == (4, 4) and shallower.level.channels == 112
    with pytest.raises(VadError, match=r"multiple of 4 x the stride of layer 'blocks.6' \(128\)"):
        CsFlow(image_size=64).preprocessing


def test_features_are_one_layer_at_three_input_sizes(fitted):
    images = tiny_image_batch(fitted)[:2]
    features = fitted.features(images)
    assert [tuple(f.shape) for f in features] == [(2, 320, 4, 4), (2, 320, 2, 2), (2, 320, 1, 1)]
    half = fitted.backbone.forward_features(images[..., ::2, ::2], ["blocks.6"])["blocks.6"]
    torch.testing.assert_close(features[1], half)  # the official nearest downsampling
    assert fitted.preprocessing.size == (128, 128) and fitted.preprocessing.interpolation == "bilinear"
    assert fitted.preprocessing.mean == fitted.backbone.preprocessing.mean


def test_the_backbone_is_frozen_and_not_saved():
    detector = CsFlow(**{**SMALL, "epochs": 1})
    before = {k: v.clone() for k, v in detector.backbone.model.state_dict().items()}
    detector.fit([tiny_image_batch(detector)[:4]])
    backbone = detector.backbone.model
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    (optimizer,), schedules = detector.optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in detector.networks["flow"].parameters()} and schedules == []
    assert all(key.startswith("flow/") for key in detector.state().tensors)


def test_a_dropped_flow_is_freed_when_the_next_one_is_built():
    import gc
    import weakref

    detector = CsFlow(**SMALL)
    enabled = gc.isenabled()
    gc.disable()  # only the collection in build() may free it
    try:
        dropped = weakref.ref(detector.build({})["flow"].module_list[1])
        assert dropped() is not None  # FrEIA's nodes hold each other: refcounting alone does not free it
        detector.build({})
        assert dropped() is None
    finally:
        if enabled:
            gc.enable()


def test_adam_is_the_official_one_and_clips_the_gradient_norm(fitted):
    (optimizer,), _ = fitted.optimizers()
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-4, (0.9, 0.999), 1e-4, 1e-5)
    parameters = list(fitted.networks["flow"].parameters())
    for parameter in parameters:
        parameter.grad = torch.full_like(parameter, 10.0)
    saved = [p.detach().clone() for p in parameters]
    optimizer.step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)  # clipped to max_grad_norm before the step
    with torch.no_grad():
        for parameter, value in zip(parameters, saved):
            parameter.copy_(value)
            parameter.grad = None


def test_training_step_is_the_official_loss(fitted):
    images = tiny_image_batch(fitted)[:3]
    flow = fitted.networks["flow"]
    with torch.no_grad():
        loss = fitted.training_step(images, torch.Generator())
        z, log_jac_det = flow(fitted.features(images))
    torch.testing.assert_close(loss, csflow_loss(list(z), log_jac_det))
    assert fitted.epochs_trained == 2 and len(fitted.history) == 2


def test_scores_and_maps_come_from_the_latents(fitted):
    images = tiny_image_batch(fitted, "test")
    prediction = fitted.predict(images)
    z = fitted.latents(images)
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 4, 4)  # the finest latent's grid
    torch.testing.assert_close(prediction.scores, image_scores(z))
    torch.testing.assert_close(prediction.maps, z[0].pow(2).mean(dim=1))
    product = CsFlow(**{**fitted.hparams, "map_mode": "product"})
    product.load_state(fitted.state())
    maps = product.predict(images).maps
    assert maps.shape == (12, 128, 128)
    torch.testing.assert_close(maps, anomaly_maps(z, "product", (128, 128)))


def test_same_seed_same_training():
    options = {**SMALL, "epochs": 1}
    first, second = CsFlow(**options), CsFlow(**options)
    first.fit([tiny_image_batch(first)])
    second.fit([tiny_image_batch(second)])
    saved = second.state().tensors
    for name, tensor in first.state().tensors.items():
        assert torch.equal(tensor, saved[name]), name


def test_saved_state_reloads_through_json_and_safetensors(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    state = fitted.state()
    save_file(state.tensors, tmp_path / "state.safetensors")
    loaded = CsFlow(**json.loads(json.dumps(fitted.hparams)))
    loaded.load_state(State(json.loads(json.dumps(state.meta)), load_file(tmp_path / "state.safetensors")))
    images = tiny_image_batch(fitted, "test")
    torch.testing.assert_close(loaded.predict(images).scores, fitted.predict(images).scores, rtol=0, atol=0)


def test_feature_source_is_the_latent_maps(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert features.shape == (2, 3 * 320, 4, 4) and source.out_channels == 960
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    torch.testing.assert_close(features[:, :320].pow(2).mean(dim=1), fitted.predict(images).maps)  # the official map
    config = json.loads(json.dumps(source.config()))
    assert config["kind"] == "detector-features" and config["detector"] == "csflow"
    hparams = dict(config["hparams"])
    rebuilt = CsFlow(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, CsFlowFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features, rtol=0, atol=0)
    coarse = fitted.feature_source(scales=[2, 0])
    assert coarse(images).shape == (2, 640, 1, 1) == (2, coarse.out_channels, 1, 1)
    for scales in ([], [0, 0], [3]):
        with pytest.raises(VadError):
            fitted.feature_source(scales=scales)
    with pytest.raises(VadError, match="before predict"):
        CsFlow(**SMALL).feature_source()(images)


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app
    from vad.model import AnomalyModel

    output = tmp_path / "run"
    options = ["epochs=1", "batch_size=4", "hidden_channels=8"]
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "csflow", "--device", "cpu", "--no-report", "--image-size", "128", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"csflow.{option}")])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "csflow" and saved["hparams"]["image_size"] == 128 and saved["hparams"]["layer"] == "blocks.6"
    model = AnomalyModel.load(output / "tiny-a" / "model")
    with open(output / "tiny-a" / "scores.csv") as handle:
        scores = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    again = {o.sample.path: o.score for o in model.predict(make_tiny_splits("tiny-a", seed=0).test)}
    np.testing.assert_allclose([again[path] for path in scores], list(scores.values()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 100},
        {"image_size": 0},
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0},
        {"betas": [0.9]},
        {"betas": [0.9, 1.0]},
        {"eps": 0},
        {"weight_decay": -1e-5},
        {"max_grad_norm": 0},
        {"coupling_blocks": 0},
        {"clamp": -1},
        {"hidden_channels": 0},
        {"kernel_sizes": [3, 5]},
        {"kernel_sizes": [3, 3, 3, 4]},
        {"map_mode": "max"},
        {"seed": "zero"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        CsFlow(**{**SMALL, **options})


def test_bad_backbones_layers_and_batches_are_clear_errors(fitted):
    images = tiny_image_batch(fitted, "test")
    with pytest.raises(VadError, match="unknown backbone 'efficientnet_b99'"):
        CsFlow(**{**SMALL, "backbone": "efficientnet_b99"}).preprocessing
    with pytest.raises(VadError, match="no layer 'blocks.9'"):
        CsFlow(**{**SMALL, "layer": "blocks.9"}).fit([images])
    with pytest.raises(VadError, match="hub is unreachable"):  # resnet18 weights do not ship offline
        CsFlow(**{**SMALL, "backbone": "resnet18"}).fit([images])
    with pytest.raises(VadError, match="before predict"):
        CsFlow(**SMALL).predict(images)
    with pytest.raises(VadError, match="empty"):
        CsFlow(**SMALL).fit([])
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(images[0])
    with pytest.raises(VadError, match=r"128 x 128 px"):
        fitted.predict(images[..., :64, :64])


def test_mismatched_state_is_refused_and_changes_nothing(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    wider = CsFlow(**{**SMALL, "hidden_channels": 16})
    with pytest.raises(VadError, match="do not fit its options"):
        wider.load_state(fitted.state())
    assert not wider.fitted
    other_layer = CsFlow(**{**SMALL, "layer": "blocks.4"})
    with pytest.raises(VadError, match="trained on a 320-channel layer"):
        other_layer.load_state(fitted.state())
    before = fitted.predict(images).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(State({}, {}))
    torch.testing.assert_close(fitted.predict(images).scores, before, rtol=0, atol=0)
