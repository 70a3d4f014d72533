"""Shared, module-independent fixtures: the packaged-weights lite0 is built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def timm():
    """timm, imported through the plugin's torchvision shim."""
    from vad_timm.compat import import_timm

    return import_timm()


@pytest.fixture(scope="session")
def lite0(timm):
    """tf_efficientnet_lite0 with the packaged ImageNet weights."""
    from vad_timm.backbone import TimmBackbone

    return TimmBackbone("tf_efficientnet_lite0")


@pytest.fixture()
def offline_hub(monkeypatch, tmp_path, timm):
    """huggingface_hub in offline mode with an empty cache, and an empty torch hub cache."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path
