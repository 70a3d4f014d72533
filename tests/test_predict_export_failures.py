"""What a user trying to break ``vad predict`` and ``vad export`` found (issue 24): inputs that
cannot be scored keep a row with their error (exit code 3), a model without thresholds says so
and how to get one, and the ONNX graph takes images of any size and scores them as vad does."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vad.build import build_model
from vad.errors import VadError
from vad.model import AnomalyModel
from vad.testing import make_tiny_splits
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from report_plugin import ReportTestPlugin  # noqa: E402


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(ReportTestPlugin(), name="report-test-plugin") as registry:
        yield registry


def vad(*args: str):
    """``vad --quiet ARGS`` in-process (stdout and stderr apart)."""
    from vad.cli import app

    return CliRunner().invoke(app, ["--quiet", *args])


def saved_model(registry, folder: Path, **changes) -> Path:
    """A tiny fitted model (fake backbone, exportable distance head) saved in ``folder``."""
    model = build_model(tiny_config(folder, detectors=["report-distance"], threshold="report-max", **changes), registry)
    splits = make_tiny_splits()
    model.fit(splits.train, splits.validation)
    return model.save(folder / "model", registry)


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Test images of the tiny data set, resized to ``sizes``, as PNG files ``part<i>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = make_tiny_splits().test[4:10]
    paths = []
    for index, (sample, (height, width)) in enumerate(zip(samples, sizes)):
        path = folder / f"part{index}.png"
        Image.fromarray(sample.load_image()).resize((width, height), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def records_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------- predict: inputs that fail


def test_inputs_that_cannot_be_scored_keep_a_row_with_their_error_and_exit_3(registry, tmp_path):
    model = saved_model(registry, tmp_path)
    images = tmp_path / "images"
    good = write_images(images, [(64, 64), (80, 72)])
    whole = good[0].read_bytes()
    (images / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (images / "x.png").write_text("not an image at all\n")
    missing = str(tmp_path / "no-such-folder")

    result = vad("predict", "--model", str(model), str(images), missing)
    assert result.exit_code == 3, (result.output, result.exception)
    records = records_of(result.stdout)
    assert [Path(r["path"]).name for r in records] == ["part0.png", "part1.png", "truncated.png", "x.png", "no-such-folder"]
    scored, failed = records[:2], records[2:]
    assert all(isinstance(r["score"], float) and r["error"] is None for r in scored)
    for record in failed:
        assert record["score"] is None and record["anomalous"] is None and record["map_max"] is None
        assert record["path"] in record["error"]
    assert "cannot read image" in failed[0]["error"] and "cannot read image" in failed[1]["error"]
    assert "no image found there" in failed[2]["error"]
    assert "3 input(s) could not be scored" in result.stderr

    out_csv = tmp_path / "scores.csv"
    result = vad("predict", "--model", str(model), str(images), missing, "--format", "csv", "--output", str(out_csv))
    assert result.exit_code == 3, (result.output, result.exception)
    with open(out_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert [bool(r["error"]) for r in rows] == [False, False, True, True, True]
    assert [r["score"] == "" for r in rows] == [False, False, True, True, True]
    assert rows[3]["anomalous"] == "" and "x.png" in rows[3]["error"]

    result = vad("predict", "--model", str(model), *map(str, good))
    assert result.exit_code == 0, (result.output, result.exception)
    assert [r["error"] for r in records_of(result.stdout)] == [None, None]


def test_no_scorable_image_is_an_error_naming_each_reason(registry, tmp_path):
    model = saved_model(registry, tmp_path)
    (tmp_path / "x.png").write_text("text")
    result = vad("predict", "--model", str(model), str(tmp_path / "x.png"), str(tmp_path / "missing.png"))
    assert isinstance(result.exception, VadError), result.output
    message = str(result.exception)
    assert message.startswith("no image could be scored") and "x.png" in message and "cannot read image" in message


def test_an_image_the_geometry_refuses_costs_its_own_row_not_the_call(registry, tmp_path):
    model = saved_model(registry, tmp_path, image_size=64, keep_aspect=True)  # trained on 64x64: square parts
    images = tmp_path / "images"
    write_images(images, [(64, 64), (64, 160), (96, 96)])
    result = vad("predict", "--model", str(model), str(images))
    assert result.exit_code == 3, (result.output, result.exception)
    records = records_of(result.stdout)
    assert [r["error"] is None for r in records] == [True, False, True]
    assert "aspect ratio" in records[1]["error"] and records[1]["score"] is None


# --------------------------------------------------------------------------- predict: missing thresholds


def test_a_model_without_thresholds_warns_once_and_says_how_to_get_one(registry, tmp_path):
    model = saved_model(registry, tmp_path)
    images = tmp_path / "images"
    write_images(images, [(64, 64), (64, 64)])
    result = vad("predict", "--model", str(model), str(images), "--overlays", str(tmp_path / "with"))
    assert result.exit_code == 0 and "threshold" not in result.stderr

    document = json.loads((model / "model.json").read_text())
    document["threshold"]["image"] = None
    del document["threshold"]["pixel"]
    (model / "model.json").write_text(json.dumps(document))
    result = vad("predict", "--model", str(model), str(images))
    assert result.exit_code == 0, (result.output, result.exception)
    assert all(r["anomalous"] is None and r["score"] is not None for r in records_of(result.stdout))
    assert result.stderr.count("warning") == 1
    warning = " ".join(result.stderr.split())  # rich wraps long lines
    for part in ("no image threshold", "threshold.image", "decision", "--threshold conformal", "--threshold manual --set manual.value="):
        assert part in warning, part

    result = vad("predict", "--model", str(model), str(images), "--overlays", str(tmp_path / "without"))
    assert result.exit_code == 0, (result.output, result.exception)
    warning = " ".join(result.stderr.split())
    assert result.stderr.count("warning") == 2
    assert "no pixel threshold" in warning and "threshold.pixel" in warning and "mask" in warning


# --------------------------------------------------------------------------- export: any input size


def identity_resized(size_in: int, size_out: int, interpolation: str) -> torch.Tensor:
    """The ``[size_out, size_in]`` operator of vad's own resize along one axis, measured by
    resizing unit vectors (width 2: torch's antialiased kernels mis-handle width 1)."""
    from vad.preprocess import resize_batch

    identity = torch.eye(size_in)[:, None, :, None].expand(-1, -1, -1, 2).contiguous()
    return resize_batch(identity, (size_out, 2), interpolation)[:, 0, :, 0].T


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "area", "lanczos"])
def test_the_graphs_resize_operator_is_the_resize_vad_applies(interpolation):
    from vad.export import resize_operator

    for size_in in (2, 7, 31, 64, 100, 257):
        for size_out in (5, 32, 64, 224):
            expected = identity_resized(size_in, size_out, interpolation)
            assert torch.allclose(resize_operator(size_in, size_out, interpolation), expected, atol=2e-6), (size_in, size_out)


def test_the_graph_takes_any_image_size_and_scores_like_vad_predict(registry, tmp_path, monkeypatch):
    """The user's journey: export, then score images of other sizes with onnxruntime exactly as
    the description says (RGB / 255, channels first, nothing else), and get vad predict's scores."""
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from vad.cli import app

    model = saved_model(registry, tmp_path)
    monkeypatch.setenv("VAD_LOG", "rich")  # the printed summary is info
    result = CliRunner().invoke(app, ["export", "--model", str(model), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, (result.output, result.exception)
    printed = " ".join(result.stderr.split())
    assert "any height and width" in printed and "antialias=True" in printed and "left to the caller" in printed
    description = json.loads((tmp_path / "m.onnx.json").read_text())
    assert description["input"]["shape"] == ["batch", 3, "height", "width"]
    assert description["inside_graph"][0] == "resize to 64x64 as torch.nn.functional.interpolate(mode='bilinear', align_corners=False, antialias=True) does"

    paths = write_images(tmp_path / "images", [(100, 90), (37, 50), (64, 64), (131, 203)])
    result = vad("predict", "--model", str(model), *map(str, paths))
    assert result.exit_code == 0, (result.output, result.exception)
    expected = [r["score"] for r in records_of(result.stdout)]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for path, score in zip(paths, expected):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        scores, maps = session.run(None, {"images": np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])})
        assert abs(float(scores[0]) - score) < 1e-4, path
        assert maps.shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("geometry", "interpolation"),
    [
        ({}, "bicubic"),
        ({"image_size": [48, 40]}, "nearest"),
        ({"resize": 80, "center_crop": [64, 48]}, "bicubic"),
        ({"tile": 32, "tile_stride": 16}, "area"),
        ({"image_size": 64, "keep_aspect": True}, "bilinear"),
    ],
    ids=["bicubic", "image-size-nearest", "resize-crop-bicubic", "tile-overlap-area", "keep-aspect"],
)
def test_export_parity_at_other_sizes_for_every_geometry_and_interpolation(registry, tmp_path, geometry, interpolation, one_torch_thread):
    pytest.importorskip("onnxruntime")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx, parity_images

    loaded = AnomalyModel.load(saved_model(registry, tmp_path, **geometry), "cpu", registry)
    source = loaded.members[0].source
    source.preprocessing = dataclasses.replace(source.preprocessing, interpolation=interpolation)
    description = export_onnx(loaded, tmp_path / "m.onnx")
    assert description["preprocessing"]["interpolation"] == interpolation
    assert ("aspect_ratio" in description["input"]) == bool(geometry.get("keep_aspect"))
    images = parity_images(loaded)
    assert len({image.shape for image in images}) == 3  # the working size, a larger and a smaller one
    assert check_parity(loaded, tmp_path / "m.onnx", images) < PARITY_TOLERANCE
