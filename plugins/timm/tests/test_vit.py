"""Vision transformers as token grids: timm's tiny test ViTs (random weights, no download)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from vad.errors import VadError
from vad.testing import single_torch_thread
from vad_timm.backbone import TimmBackbone
from vad_timm.vit import default_position_interpolation, resize_position_embedding


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``vad.testing.one_torch_thread``)."""


@pytest.fixture(scope="module")
def registers_vit(timm):
    """timm's test_vit2: no class token, one register token, patch 16, 8 blocks of 64 channels."""
    with single_torch_thread():
        return TimmBackbone("test_vit2", pretrained=False, final_norm=True)


def test_grid_is_the_patch_tokens_of_timms_own_forward(registers_vit, timm):
    reference = timm.create_model("test_vit2", pretrained=False, dynamic_img_size=True).eval()
    reference.load_state_dict(registers_vit.model.state_dict())
    x = torch.randn(2, 3, 64, 96)
    grids = registers_vit.forward_features(x, ["3", "blocks.7"])
    assert tuple(grids["blocks.7"].shape) == (2, 64, 4, 6) and registers_vit.feature_info()[3].stride == 16
    with torch.inference_mode():
        tokens = reference.forward_features(x)  # every token of the last block, final norm applied
        block3 = reference.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
    assert tokens.shape[1] == 1 + 4 * 6  # the register token comes first, and is dropped from the grid
    torch.testing.assert_close(grids["blocks.7"], tokens[:, 1:].reshape(2, 4, 6, 64).permute(0, 3, 1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(grids["3"], block3, atol=1e-5, rtol=0)
    # the cached position embedding is resized from the pretrained one: back and forth changes nothing
    registers_vit.forward_features(torch.randn(1, 3, 160, 160), ["0"])
    torch.testing.assert_close(registers_vit.forward_features(x, ["3"])["3"], grids["3"], atol=0, rtol=0)
    facts = registers_vit.describe()["vision_transformer"]
    assert facts["prefix_tokens"] == {"class": 0, "registers": 1, "other": 0} and facts["input_multiple"] == 16 and "dropped" in facts["grid"]


def test_final_norm_is_the_networks_last_norm(registers_vit):
    raw = TimmBackbone("test_vit2", pretrained=False)
    raw.model.load_state_dict(registers_vit.model.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        normed = registers_vit.model.norm(raw.forward_features(x, ["2"])["2"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(registers_vit.forward_features(x, ["2"])["2"], normed, atol=1e-5, rtol=0)


def test_input_not_a_multiple_of_the_patch_is_refused(registers_vit):
    with pytest.raises(VadError, match=r"70x64 px input is not a multiple of 16.*height 64 or 80, width 64\)"):
        registers_vit.forward_features(torch.randn(1, 3, 70, 64), ["0"])


def test_position_embedding_rules():
    assert default_position_interpolation("vit_small_patch14_dinov2") == "dinov2"
    for name in ("vit_base_patch14_reg4_dinov2", "vit_small_patch16_dinov3", "vit_base_patch16_clip_224"):
        assert default_position_interpolation(name) == "timm"
    embedding = torch.randn(1, 1 + 37 * 37, 8)
    ours = resize_position_embedding(embedding, (37, 37), (32, 40), 1, "dinov2")
    # the official DINOv2 code (interpolate_pos_encoding, interpolate_offset 0.1, no antialias)
    h0, w0, m = 32, 40, 37
    patches = embedding[:, 1:].reshape(1, m, m, 8).permute(0, 3, 1, 2)
    official = F.interpolate(patches, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False)
    official = torch.cat([embedding[:, :1], official.permute(0, 2, 3, 1).reshape(1, -1, 8)], dim=1)
    torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)
    antialiased = resize_position_embedding(embedding, (37, 37), (32, 40), 1, "timm")
    assert antialiased.shape == ours.shape and not torch.equal(antialiased, ours)


def test_official_dinov2_style_checkpoint_loads(tmp_path, timm):
    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False).eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 64)  # the official DINOv2 files carry it; timm's converter drops it
    path = tmp_path / "dinov2_style_pretrain.pth"
    torch.save(state, path)
    backbone = TimmBackbone("test_vit", weights=str(path))
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        expected = reference.forward_intermediates(x, indices=[5], intermediates_only=True)[0]
    torch.testing.assert_close(backbone.forward_features(x, ["5"])["5"], expected, atol=1e-5, rtol=0)


def test_cnn_refuses_the_transformer_options(timm):
    with pytest.raises(VadError, match="apply to vision transformers; 'resnet18' is not one"):
        TimmBackbone("resnet18", pretrained=False, final_norm=True)


def test_dinov2_offline_fails_fast_without_building(offline_hub):
    started = time.perf_counter()
    with pytest.raises(VadError, match="no weights for 'vit_small_patch14_dinov2'.*--weights"):
        TimmBackbone("vit_small_patch14_dinov2")
    assert time.perf_counter() - started < 1.0


def test_patch_features_default_to_the_mid_level_blocks_of_a_vit(registers_vit):
    from vad.features import default_layers

    assert default_layers(registers_vit) == ["blocks.3", "blocks.5"]  # half and three quarters of 8 blocks


def test_run_with_an_input_size_the_vit_cannot_read_stops_before_the_run_folder(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "patchcore", "--device", "cpu", "--no-report",
        "--backbone", "timm:test_vit2", "--no-pretrained", "--image-size", "70", "--output", str(run_folder),
    ])
    assert isinstance(result.exception, VadError)
    assert "70x70 px input is not a multiple of 16" in str(result.exception) and "height 64 or 80" in str(result.exception)
    assert not run_folder.exists()
