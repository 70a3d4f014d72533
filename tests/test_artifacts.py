"""Artifacts: atomic writes, model folders, format versions."""

from __future__ import annotations

import json

import pytest
import torch

from vad import artifacts
from vad.errors import DamagedModelError, VadError

#: The least ``model.json`` content a model folder is read with: one member and its detector.
MINIMAL = {"members": [{"detector": {"name": "d", "hparams": {}}}]}


def test_model_folder_round_trip(tmp_path):
    folder = artifacts.write_model_folder(tmp_path / "m", {**MINIMAL, "hello": 1}, {"a/b": torch.arange(3.0)})
    document, tensors = artifacts.read_model_folder(folder)
    assert document["hello"] == 1 and document["format_version"] == artifacts.MODEL_FORMAT_VERSION
    assert torch.equal(tensors["a/b"], torch.arange(3.0))
    assert not list(tmp_path.glob(".*"))  # no staging or backup folders left


def test_a_failed_save_keeps_the_old_model_and_leaves_no_debris(tmp_path):
    folder = artifacts.write_model_folder(tmp_path / "m", {**MINIMAL, "version": "old"}, {"x": torch.zeros(1)})
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
    folder = artifacts.write_model_folder(tmp_path / "m", MINIMAL, {})
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


def test_a_missing_or_unreadable_tensors_file_names_it(tmp_path):
    folder = artifacts.write_model_folder(tmp_path / "m", MINIMAL, {"x": torch.zeros(4)})
    tensors = folder / artifacts.TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-4])
    with pytest.raises(DamagedModelError, match=r"the model folder .*m is damaged: tensors.safetensors cannot be read.*Re-fit the model") as caught:
        artifacts.read_model_folder(folder)
    assert caught.value.folder == folder and caught.value.file == artifacts.TENSORS_FILE
    tensors.unlink()
    with pytest.raises(DamagedModelError, match="tensors.safetensors is missing"):
        artifacts.read_model_folder(folder)


PATCH_SOURCE = {"kind": "patch-features", "hparams": {"backbone": {"spec": "b", "hparams": {}}}}


@pytest.mark.parametrize(
    "document, problem",
    [
        ([], "holds a list, not the object vad writes"),
        ({"format": "vad-model", "format_version": True, **MINIMAL}, "has true or false as 'format_version', where vad writes an integer"),
        ({}, "has no entry 'members'"),
        ({"members": [{"detector": {"name": "d", "hparams": {}, "meta": []}}]}, "has a list as 'members[0].detector.meta', where vad writes an object"),
        ({"members": [{"detector": {"name": "d"}}]}, "has no entry 'members[0].detector.hparams'"),
        ({**MINIMAL, "threshold": {"image": "0.5"}}, "has a string as 'threshold.image', where vad writes a number or null"),
        ({**MINIMAL, "geometry": {"tile": 1.5}}, "has a number as 'geometry.tile', where vad writes an integer or null"),
        ({**MINIMAL, "calibration": {"image_false_alarm": {"scores": 3}}}, "has no entry 'calibration.image_false_alarm.confidence'"),
        ({"members": [{**MINIMAL["members"][0], "source": {"kind": "patch-features", "hparams": {}}}]}, "has no entry 'members[0].source.hparams.backbone'"),
        ({"members": [{**MINIMAL["members"][0], "source": {"kind": "detector-features", "hparams": {"detector": {}}}}]}, "has no entry 'members[0].source.detector'"),
        ({"members": [{**MINIMAL["members"][0], "source": {"kind": "pca-global", "hparams": {"members": []}}}]}, "has an empty list as 'members[0].source.hparams.members'"),
        ({"members": [{**MINIMAL["members"][0], "source": {"kind": "pca-global", "hparams": {"members": [{"kind": "patch-features", "hparams": {"backbone": "b"}}]}}}]},
         "has a string as 'members[0].source.hparams.members[0].hparams.backbone', where vad writes an object"),
    ],
)
def test_model_json_entries_that_loading_reads_are_checked(tmp_path, document, problem):
    folder = artifacts.write_model_folder(tmp_path / "m", MINIMAL, {})
    if isinstance(document, dict):
        document = {"format": artifacts.MODEL_FORMAT, "format_version": artifacts.MODEL_FORMAT_VERSION, **document}
    (folder / artifacts.MODEL_JSON).write_text(json.dumps(document))
    with pytest.raises(DamagedModelError) as caught:
        artifacts.read_model_folder(folder)
    assert str(caught.value) == f"the model folder {folder} is damaged: model.json {problem}. Re-fit the model (vad run), or restore the folder from a backup"


def test_every_source_kind_vad_writes_passes_the_check(tmp_path):
    sources = [
        PATCH_SOURCE,
        {"kind": "detector-features", "detector": "draem", "hparams": {"detector": {}, "layer": 1}},
        {"kind": "pca-global", "hparams": {"members": [PATCH_SOURCE, PATCH_SOURCE], "dim": 8}, "meta": {}},
    ]
    document = {"members": [{**MINIMAL["members"][0], "source": source} for source in sources], "ensembler": None, "geometry": None}
    folder = artifacts.write_model_folder(tmp_path / "m", document, {})
    assert artifacts.read_model_folder(folder)[0]["members"][2]["source"]["kind"] == "pca-global"


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    from vad import artifacts

    artifacts.atomic_write_text(tmp_path / "a.txt", "x")
    artifacts.write_model_folder(tmp_path / "m", {"members": []}, {})
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == artifacts.FILE_MODE
    assert (tmp_path / "m").stat().st_mode & 0o777 == artifacts.FOLDER_MODE
    assert (tmp_path / "m" / "model.json").stat().st_mode & 0o777 == artifacts.FILE_MODE
