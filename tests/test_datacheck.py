"""Bad images and masks are found before the fit: the run stops with nothing written, or
``--skip-bad`` leaves them out of every count and lists them (vad.datacheck)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vad.cli import main


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # messages on one line: paths are not folded
    monkeypatch.setenv("VAD_LOG", "rich")  # info lines shown (and --quiet elsewhere undone afterwards)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A folder data set: 10 good and 3 defective 32 px images, masks by name."""
    rng = np.random.default_rng(0)
    root = tmp_path / "part"
    for i in range(10):
        _save(root / "good" / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for i in range(3):
        _save(root / "bad" / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        _save(root / "masks" / f"{i}_mask.png", mask)
    return root


def _run(data: Path, output: Path, *extra: str) -> tuple[int, str]:
    arguments = ["run", "--dataset", "folder", "--root", str(data), "--set", "folder.abnormal_dirs=bad", "--set", "folder.mask_dirs=masks",
                 "--image-size", "32", "--device", "cpu", "--no-report", "--output", str(output), *extra]
    try:
        main(arguments)
    except SystemExit as stopped:
        return int(stopped.code or 0), ""
    return 0, ""


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated training image", "truncated mask", "mask of another size"])
def test_a_bad_file_stops_the_run_before_anything_is_written(damage, data, tmp_path, capsys):
    if damage == "truncated training image":
        _truncate(data / "good" / "3.png")
        named = "good/3.png"
    elif damage == "truncated mask":
        _truncate(data / "masks" / "1_mask.png")
        named = "1_mask.png"
    else:
        _save(data / "masks" / "1_mask.png", np.zeros((16, 16), np.uint8))
        named = "16x16"
    code, _ = _run(data, tmp_path / "run")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "error: " in err and named in err and "--skip-bad" in err and "Nothing was fitted" in err
    assert not (tmp_path / "run").exists()


def test_skip_bad_leaves_bad_images_and_masks_out_of_every_count_and_lists_them(data, tmp_path, capsys):
    _truncate(data / "good" / "3.png")  # a training image (passes the header check, fails to decode)
    _save(data / "masks" / "1_mask.png", np.zeros((16, 16), np.uint8))  # a test image's mask
    (data / "good" / "9.png").write_text("not an image")  # fails the data set's header check
    code, _ = _run(data, tmp_path / "run", "--skip-bad")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert "good/3.png" in err and "1_mask.png" in err and "good/9.png" in err  # listed on the terminal
    # 10 good: 2 unreadable, 8 left -> 6 train + 2 test normals (folder.test_fraction 0.2); 2 of 3 defective
    assert "6 train, 0 validation, 4 test images" in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {Path(item[0]).name for item in metrics["skipped_files"]["part"]} == {"3.png", "1.png", "9.png"}
    assert metrics["calibration"]["part"]["scores"] == 6  # only readable images were calibrated on
