"""A catalogue of bad user input: every case is one ``error:`` line, exit code 2, no traceback,
and nothing written (damaged model folders: tests/test_damaged_models.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vad.cli import main


def _image(path: Path, size: int = 32, seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Bad files next to good ones: configs, a foreign folder, wrong layouts, one-image data."""
    (tmp_path / "not-yaml.yaml").write_text("detectors: [patchcore\n")
    (tmp_path / "list.yaml").write_text("- patchcore\n")
    (tmp_path / "unknown-key.yaml").write_text("detectorz: [patchcore]\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    _image(tmp_path / "mvtec" / "fabric" / "good" / "0.png")  # MVTec category with the wrong inside
    _image(tmp_path / "one" / "good" / "0.png")  # one training image
    for i in range(3):
        _image(tmp_path / "one" / "test" / f"{i}.png", seed=i + 1)
        _image(tmp_path / "one" / "bad" / f"{i}.png", seed=i + 9)
    for i in range(2):  # two training images
        _image(tmp_path / "two" / "good" / f"{i}.png", seed=20 + i)
    (tmp_path / "two" / "test").symlink_to(tmp_path / "one" / "test")
    (tmp_path / "two" / "bad").symlink_to(tmp_path / "one" / "bad")
    _image(tmp_path / "image.png")
    return tmp_path


RUN = ["run", "--category", "brick", "--no-report"]
ONE_IMAGE = ["--dataset", "folder", "--root", "{tmp}/one", "--set", "folder.abnormal_dirs=bad", "--set", "folder.normal_test_dir=test"]

CATALOGUE = {
    "unknown option": ([*RUN, "--set", "patchcore.coreset_ration=0.1"], "did you mean 'coreset_ratio'"),
    "broken YAML value": ([*RUN, "--set", "patchcore.coreset_ratio=[1,2"], "not valid YAML"),
    "misspelled plugin": ([*RUN, "--set", "patchcor.coreset_ratio=0.1"], "did you mean 'patchcore'"),
    "option of an unused threshold": ([*RUN, "--set", "quantile.q=0.5"], "does not use 'quantile'"),
    "option value out of range": ([*RUN, "--set", "quantile.q=2", "--threshold", "quantile"], "q must be"),
    "not a boolean": ([*RUN, "--set", "patchcore.reweight=maybe"], "true or false"),
    "--set without =": ([*RUN, "--set", "patchcore"], "NAME.KEY=VALUE"),
    "unknown metric": ([*RUN, "--metric", "no-such-metric"], "unknown metric"),
    "unknown detector": ([*RUN, "--detector", "patchcor"], "did you mean 'patchcore'"),
    "unknown threshold": ([*RUN, "--threshold", "sigma"], "unknown threshold"),
    "unknown ensemble": ([*RUN, "--ensemble", "pca-globl"], "unknown ensembler"),
    "unknown dataset": ([*RUN, "--dataset", "mvtek"], "unknown dataset"),
    "unknown calibration": ([*RUN, "--calibration", "magic"], "unknown calibration"),
    "missing root": (["run", "--dataset", "mvtec", "--root", "{tmp}/nowhere"], "does not exist"),
    "wrong layout inside a category": (["run", "--dataset", "mvtec", "--root", "{tmp}/mvtec", "--category", "fabric"], "train/good"),
    "missing config": (["run", "--config", "{tmp}/missing.yaml"], "does not exist"),
    "config not YAML": (["run", "--config", "{tmp}/not-yaml.yaml"], "not valid YAML"),
    "config not a mapping": (["run", "--config", "{tmp}/list.yaml"], "must hold a mapping"),
    "config unknown key": (["run", "--config", "{tmp}/unknown-key.yaml"], "did you mean 'detectors'"),
    "bad image size": ([*RUN, "--image-size", "big"], "image"),
    "bad validation fraction": ([*RUN, "--validation-fraction", "1.5"], "validation_fraction"),
    "bad batch size": ([*RUN, "--batch-size", "0"], "batch_size"),
    "bad device": ([*RUN, "--device", "gpu0"], "unknown device"),
    "resume nothing": (["run", "--resume", "{tmp}/nowhere"], "no config.yaml"),
    "output is a file": ([*RUN, "--output", "{tmp}/a-file"], "is a file"),
    "output holds no run": ([*RUN, "--output", "{tmp}/foreign", "--overwrite"], "not a vad run folder"),
    "missing saved model": ([*RUN, "--model", "{tmp}/nowhere"], "no model.json"),
    "one training image": (["run", "--no-report", *ONE_IMAGE], "at least 2 training images"),
    "one training image, manual threshold needs no calibration": (["run", "--no-report", *ONE_IMAGE, "--threshold", "manual", "--set", "manual.value=1", "--metric", "nope"], "unknown metric"),
    "k-sigma on one validation score": (
        ["run", "--no-report", *(a.replace("/one", "/two") for a in ONE_IMAGE), "--validation-fraction", "0.5", "--threshold", "k-sigma"],
        "gives 1 normal score(s), and the 'k-sigma' threshold needs at least 2",
    ),
    "predict without a model": (["predict", "--model", "{tmp}/nowhere", "{tmp}/image.png"], "model"),
    "export without a model": (["export", "--model", "{tmp}/nowhere", "--output", "{tmp}/m.onnx"], "model"),
    "bench without a grid": (["bench", "--grid", "{tmp}/missing.yaml"], "does not exist"),
    "unknown kind": (["list", "gadgets"], "unknown kind"),
    "not a number": ([*RUN, "--batch-size", "many"], "valid integer"),
    "unknown flag": ([*RUN, "--colour"], "no such option"),
    "unknown command": (["rnu"], "no such command"),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_is_one_clear_error(case, files, capsys, monkeypatch):
    arguments, expected = CATALOGUE[case]
    monkeypatch.chdir(files)  # a default runs/ would land here
    monkeypatch.setenv("VAD_LOG", "rich")  # --quiet sets it for the process: restored afterwards
    before = sorted(str(p) for p in files.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        main(["--quiet", *(a.replace("{tmp}", str(files)) for a in arguments)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert expected.lower() in " ".join(err.split()).lower(), err
    assert sorted(str(p) for p in files.rglob("*")) == before  # nothing written, nothing removed


def test_an_unwritable_output_is_a_clear_error(files, capsys, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = files / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv("VAD_LOG", "rich")
    with pytest.raises(SystemExit) as stopped:
        main(["--quiet", *RUN, "--output", str(locked / "run")])
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith("error: ")
