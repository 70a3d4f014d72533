"""Artifacts: atomic writes, model folders, format versions."""

from __future__ import annotations

import json

import pytest
import torch

from vad import artifacts
from vad.errors import VadError


def test_model_folder_round_trip(tmp_path):
    folder = artifacts.write_model_folder(tmp_path / "m", {"hello": 1}, {"a/b": torch.arange(3.0)})
    document, tensors = artifacts.read_model_folder(folder)
    assert document["hello"] == 1 and document["format_version"] == artifacts.MODEL_FORMAT_VERSION
    assert torch.equal(tensors["a/b"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*"))  # no staging or backup folders left


def test_a_failed_save_keeps_the_old_model_and_leaves_no_debris(tmp_path):
    folder = artifacts.write_model_folder(tmp_path / "m", {"version": "old"}, {"x": torch.zeros(1)})
    with pytest.raises(ValueError):
        artifacts.write_model_folder(folder, {"bad": float("nan")}, {"x": torch.ones(1)})
    document, _ = artifacts.read_model_folder(folder)
    assert document["version"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    artifacts.atomic_write_json(target, {"a": 1})
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        artifacts.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_incompatible_format_version_is_a_clear_error(tmp_path):
    folder = artifacts.write_model_folder(tmp_path / "m", {}, {})
    document = json.loads((folder / "model.json").read_text())
    document["format_version"] = 999
    (folder / "model.json").write_text(json.dumps(document))
    with pytest.raises(VadError, match="format version 999.*Re-fit"):
        artifacts.read_model_folder(folder)
    document["format_version"] = 1  # the previous format still reads (it has no geometry or calibration)
    (folder / "model.json").write_text(json.dumps(document))
    assert artifacts.read_model_folder(folder)[0]["format_version"] == 1


def test_not_a_model_folder(tmp_path):
    with pytest.raises(VadError, match="model.json is missing"):
        artifacts.read_model_folder(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(VadError, match="not valid JSON"):
        artifacts.read_model_folder(tmp_path)
