"""Damaged model folders: every way a saved model can be broken is one clear ``error:`` line
from ``vad predict``, ``vad run --model`` and ``vad export`` (exit 2, no traceback) that names
the folder and the file and says what to do."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from vad.artifacts import MODEL_JSON, TENSORS_FILE
from vad.cli import main
from vad.pipeline import run
from vad.plugins import Registry
from vad.testing import FakesPlugin
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402  (the template's detector, imported from its folder)


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory) -> Path:
    """A model folder fitted once on the tiny data (fake backbone, template detector), in a
    registry of its own so that the tests' registrations do not clash with it."""
    registry = Registry()
    registry.register_plugin(FakesPlugin(), "vad-testing-fakes")
    if not registry.pm.is_registered(vad_template):  # found through its entry point where installed
        registry.register_plugin(vad_template, "template-under-test")
    folder, _ = run(tiny_config(tmp_path_factory.mktemp("fit"), categories=["tiny-a"]), registry)
    return folder / "tiny-a" / "model"


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(vad_template, name="template-under-test") as registry:
        yield registry


def _edit_json(change):
    """A damage that loads model.json, lets ``change`` alter it in place, and writes it back."""

    def damage(folder: Path) -> None:
        document = json.loads((folder / MODEL_JSON).read_text())
        change(document)
        (folder / MODEL_JSON).write_text(json.dumps(document))

    return damage


def _replace_tensors_folder(folder: Path) -> None:
    (folder / TENSORS_FILE).unlink()
    (folder / TENSORS_FILE).mkdir()


#: name: (the file damaged, how)
DAMAGES = {
    "tensors deleted": (TENSORS_FILE, lambda folder: (folder / TENSORS_FILE).unlink()),
    "tensors a folder": (TENSORS_FILE, _replace_tensors_folder),
    "tensors truncated": (TENSORS_FILE, lambda folder: (folder / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes()[:-16])),
    "tensors header cut": (TENSORS_FILE, lambda folder: (folder / TENSORS_FILE).write_bytes((folder / TENSORS_FILE).read_bytes()[:12])),
    "tensors empty": (TENSORS_FILE, lambda folder: (folder / TENSORS_FILE).write_bytes(b"")),
    "tensors garbage": (TENSORS_FILE, lambda folder: (folder / TENSORS_FILE).write_bytes(b"not a safetensors file at all" * 8)),
    "json not json": (MODEL_JSON, lambda folder: (folder / MODEL_JSON).write_text("{cut short")),
    "json not utf-8": (MODEL_JSON, lambda folder: (folder / MODEL_JSON).write_bytes(b"\xff\xfe garbage")),
    "json a list": (MODEL_JSON, lambda folder: (folder / MODEL_JSON).write_text("[1, 2]")),
    "json a number": (MODEL_JSON, lambda folder: (folder / MODEL_JSON).write_text("3")),
    "json no format": (MODEL_JSON, _edit_json(lambda d: d.pop("format"))),
    "members missing": (MODEL_JSON, _edit_json(lambda d: d.pop("members"))),
    "members an object": (MODEL_JSON, _edit_json(lambda d: d.update(members={}))),
    "members empty": (MODEL_JSON, _edit_json(lambda d: d.update(members=[]))),
    "detector a string": (MODEL_JSON, _edit_json(lambda d: d["members"][0].update(detector="feature-distance"))),
    "detector name missing": (MODEL_JSON, _edit_json(lambda d: d["members"][0]["detector"].pop("name"))),
    "detector hparams a list": (MODEL_JSON, _edit_json(lambda d: d["members"][0]["detector"].update(hparams=[]))),
    "detector meta null": (MODEL_JSON, _edit_json(lambda d: d["members"][0]["detector"].update(meta=None))),
    "source backbone missing": (MODEL_JSON, _edit_json(lambda d: d["members"][0]["source"]["hparams"].pop("backbone"))),
    "source kind a number": (MODEL_JSON, _edit_json(lambda d: d["members"][0]["source"].update(kind=3))),
    "threshold a list": (MODEL_JSON, _edit_json(lambda d: d.update(threshold=[]))),
    "threshold image a string": (MODEL_JSON, _edit_json(lambda d: d["threshold"].update(image="high"))),
    "postprocess a number": (MODEL_JSON, _edit_json(lambda d: d.update(postprocess=4))),
    "sigma a string": (MODEL_JSON, _edit_json(lambda d: d.update(postprocess={"sigma": "4"}))),
    "geometry a list": (MODEL_JSON, _edit_json(lambda d: d.update(geometry=[64]))),
    "geometry size a string": (MODEL_JSON, _edit_json(lambda d: d.update(geometry={"image_size": "abc"}))),
    "calibration a list": (MODEL_JSON, _edit_json(lambda d: d.update(calibration=[1]))),
    "ensembler a string": (MODEL_JSON, _edit_json(lambda d: d.update(ensembler="mean"))),
    "batch size a string": (MODEL_JSON, _edit_json(lambda d: d.update(batch_size="8"))),
    "seed true": (MODEL_JSON, _edit_json(lambda d: d.update(seed=True))),
}

COMMANDS = {
    "predict": lambda model, work: ["predict", "--model", str(model), str(work / "image.png")],
    "run --model": lambda model, work: ["run", "--dataset", "tiny", "--category", "tiny-a", "--device", "cpu", "--no-report", "--model", str(model), "--output", str(work / "run")],
    "export": lambda model, work: ["export", "--model", str(model), "--output", str(work / "model.onnx")],
}


def _vad(argv: list[str], capsys) -> tuple[int, str]:
    """Run the console script's entry point in this process: exit code and stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["--quiet", *argv])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_folder_is_one_clear_error(registry, fitted_model, tmp_path, capsys, damage, command):
    from vad_datasets.examples import write_image

    model = tmp_path / "model"
    shutil.copytree(fitted_model, model)
    damaged_file, apply = DAMAGES[damage]
    apply(model)
    write_image(tmp_path / "image.png")
    code, stderr = _vad(COMMANDS[command](model, tmp_path), capsys)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    assert f"the model folder {model} is damaged: {damaged_file}" in stderr
    assert "Re-fit the model" in stderr and "restore the folder" in stderr


def test_the_undamaged_model_loads(registry, fitted_model, tmp_path, capsys):
    """The catalogue's errors come from the damage: the same folder unharmed predicts."""
    from vad_datasets.examples import write_image

    write_image(tmp_path / "image.png")
    with pytest.raises(SystemExit) as exited:
        main(["--quiet", *COMMANDS["predict"](fitted_model, tmp_path)])
    assert exited.value.code in (0, None), capsys.readouterr().err
