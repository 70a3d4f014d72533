"""The torchvision shim (only where needed, inert elsewhere) and the hub's offline switch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _python(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120)


def test_shim_is_installed_exactly_when_the_plain_import_fails():
    result = _python(
        """
        try:
            import torchvision
            needed = False
        except RuntimeError as error:
            assert "torchvision::nms does not exist" in str(error), error
            needed = True
        from vad_timm import compat
        torchvision = compat.import_torchvision()
        import torch
        print(needed, compat.torchvision_shim_installed(), torchvision.__version__)
        # the schema is defined (no kernel: nothing in vad calls NMS)
        print(torch.ops.torchvision.nms.default._schema)
        """
    )
    assert result.returncode == 0, result.stderr
    needed, installed, _ = result.stdout.split("\n")[0].split()
    assert installed == needed
    assert "nms(Tensor dets, Tensor scores, float iou_threshold)" in result.stdout


def test_import_timm_goes_through_the_shim(timm):
    import torchvision

    from vad_timm import compat

    assert compat.import_timm() is timm and torchvision.__version__


def test_shim_changes_nothing_when_torchvision_imports_cleanly(tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = 'clean'\n")
    result = _python(
        """
        import sys
        from vad_timm import compat
        module = compat.import_torchvision()
        print(module.__version__, compat.torchvision_shim_installed(), "torch" in sys.modules)
        """,
        extra_path=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["clean", "False", "False"]  # no shim, torch not even imported


def test_other_torchvision_errors_are_not_hidden(tmp_path):
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('some other failure')\n")
    result = _python("from vad_timm import compat; compat.import_torchvision()", extra_path=str(tmp_path))
    assert result.returncode != 0
    assert "some other failure" in result.stderr


def test_unreachable_hub_switches_huggingface_hub_offline(monkeypatch, timm):
    import huggingface_hub.constants as hub_constants

    from vad_timm import compat

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert compat.use_offline_hub_if_unreachable(timeout=0.5) is True
    assert hub_constants.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_explicit_online_setting_is_respected_without_probing(monkeypatch, timm):
    import huggingface_hub.constants as hub_constants

    from vad_timm import compat

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(compat, "hub_reachable", lambda timeout=0.5: pytest.fail("probed"))
    assert compat.use_offline_hub_if_unreachable() is False
