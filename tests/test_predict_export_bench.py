"""End to end: ``vad run`` on the tiny data with the report and raw maps, then ``vad predict``,
``vad export`` (onnxruntime parity) and ``vad bench`` on the result; every file is checked, and
``report.html`` is screenshotted in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from vad.errors import SOME_FAILED, VadError
from vad.testing import make_tiny_splits

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from report_plugin import ReportTestPlugin  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(ReportTestPlugin(), name="report-test-plugin") as registry:
        yield registry


@pytest.fixture
def cli():
    """The ``vad`` app (predict / export / bench included), quiet."""
    from vad.cli import app

    def invoke(*args: str):
        return CliRunner().invoke(app, ["--quiet", *args])

    return invoke


def run_tiny(cli, folder: Path, *extra: str):
    result = cli(
        "run", "--dataset", "tiny", "--backbone", "fake-backbone", "--detector", "report-distance",
        "--threshold", "report-max", "--device", "cpu", "--output", str(folder), *extra,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return folder


class Links(HTMLParser):
    """Every src / href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value:
                self.links.append(value)
                if tag == "img":
                    self.images.append(value)


def decode_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def chromium() -> str:
    """The chromium binary, installed with apt-get when missing; skips when that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and cannot be installed here (no apt-get or not root)")
    try:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.SubprocessError, OSError) as error:
        pytest.skip(f"headless Chromium is missing and `apt-get install -y chromium` failed: {error}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("`apt-get install -y chromium` ran but no chromium binary appeared")
    return found


def screenshot(page: Path, target: Path, profile: Path) -> np.ndarray:
    binary = chromium()
    subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={target}", "--window-size=1280,2000", page.resolve().as_uri()],
        capture_output=True, timeout=120, check=False,
    )
    assert target.is_file(), "chromium wrote no screenshot"
    return decode_png(target)


def test_run_report_predict_export_end_to_end(registry, cli, tmp_path):
    import tifffile

    run = run_tiny(cli, tmp_path / "run", "--save-maps")
    splits = {c: make_tiny_splits(c, seed=i) for i, c in enumerate(["tiny-a", "tiny-b"])}

    # ---- per category: plots, overlays, index, raw maps
    for category, split in splits.items():
        report = run / category / "report"
        index = json.loads((report / "index.json").read_text())
        assert set(index["plots"]) == {"roc", "pro", "histogram"}
        for plot in index["plots"].values():
            assert decode_png(run / category / plot).shape[0] > 100
        assert len(index["overlays"]) == len(split.test)  # 12 images < the cap: all of them
        assert [o["label"] for o in index["overlays"]][:6] == [1] * 6  # defective first
        strip = decode_png(run / category / index["overlays"][0]["file"])
        assert strip.shape[1] > 3 * strip.shape[0]
        for sample in split.test:
            tiff = run / "anomaly_maps" / category / "test" / sample.defect_type / (Path(sample.path).stem + ".tiff")
            data = tifffile.imread(tiff)
            assert data.dtype == np.float32 and data.shape == sample.load_image().shape[:2]
        with open(run / category / "scores.csv") as handle:
            assert len(list(csv.DictReader(handle))) == len(split.test)

    # ---- report.html: parses, every referenced file exists
    page = run / "report.html"
    parser = Links()
    parser.feed(page.read_text(encoding="utf-8"))
    assert len(parser.images) >= 2 * (3 + 12)
    for link in parser.links:
        assert not urlparse(link).scheme, f"report.html must work offline, found {link}"
        assert (run / link).is_file(), f"report.html references a missing file: {link}"

    # ---- headless Chromium: the page renders, with coloured heat maps
    shot = screenshot(page, tmp_path / "shot.png", tmp_path / "chromium-profile")
    assert shot.std() > 20, "the screenshot is blank"
    saturation = shot.max(axis=2).astype(int) - shot.min(axis=2)
    assert (saturation > 100).mean() > 0.01, "no coloured heat maps visible in the screenshot"

    # ---- predict: JSON lines, CSV, overlays; a corrupt file gets a row with its error (exit code 3)
    model = run / "tiny-a" / "model"
    images = tmp_path / "new"
    images.mkdir()
    from PIL import Image

    for index, sample in enumerate(splits["tiny-a"].test[4:8]):
        Image.fromarray(sample.load_image()).save(images / f"part{index}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = cli("predict", "--model", str(model), str(images), "--overlays", str(tmp_path / "overlays"))
    assert result.exit_code == 3, (result.output, result.exception)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["path"]).name for r in records] == ["broken.png"] + [f"part{i}.png" for i in range(4)]
    broken, records = records[0], records[1:]
    assert broken["score"] is None and broken["anomalous"] is None and "broken.png" in broken["error"]
    assert "1 input(s) could not be scored" in result.stderr
    threshold = json.loads((model / "model.json").read_text())["threshold"]["image"]
    for record in records:
        assert record["error"] is None
        assert record["anomalous"] == (record["score"] >= threshold)
        assert decode_png(Path(record["overlay"])).shape[0] > 50
    out_csv = tmp_path / "scores.csv"
    result = cli("predict", "--model", str(model), str(images / "part*.png"), "--format", "csv", "--output", str(out_csv))
    assert result.exit_code == 0, (result.output, result.exception)
    with open(out_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["score"]) for r in rows] == pytest.approx([r["score"] for r in records], rel=1e-6)

    # ---- export: ONNX graph, description, parity with torch (here and checked by the command)
    onnx_file = tmp_path / "model.onnx"
    result = cli("export", "--model", str(model), "--format", "onnx", "--output", str(onnx_file))
    assert result.exit_code == 0, (result.output, result.exception)
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(onnx_file)))
    description = json.loads((tmp_path / "model.onnx.json").read_text())
    assert description["image_threshold"] == pytest.approx(threshold)
    test_images = [s.load_image() for s in splits["tiny-a"].test]
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    batch = np.stack(test_images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    onnx_scores, onnx_maps = session.run(None, {"images": np.ascontiguousarray(batch)})
    with open(run / "tiny-a" / "scores.csv") as handle:
        torch_scores = np.array([float(r["score"]) for r in csv.DictReader(handle)])
    assert np.abs(onnx_scores - torch_scores).max() < 1e-4
    assert onnx_maps.shape == (len(test_images), 64, 64)
    for sample, onnx_map in zip(splits["tiny-a"].test, onnx_maps):  # network size == image size here
        saved = tifffile.imread(run / "anomaly_maps" / "tiny-a" / "test" / sample.defect_type / (Path(sample.path).stem + ".tiff"))
        assert np.abs(saved - onnx_map).max() < 1e-4


def test_export_resizes_inside_the_graph_like_torch(registry, tmp_path):
    from vad.export import check_parity, export_onnx
    from vad.model import AnomalyModel
    from vad.pipeline import run
    from vad.config import RunConfig

    folder, _ = run(RunConfig(dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu", categories=["tiny-a"], report=False, output=str(tmp_path / "r")), registry)
    model = AnomalyModel.load(folder / "tiny-a" / "model", "cpu", registry)
    rng = np.random.default_rng(1)
    description = export_onnx(model, tmp_path / "any.onnx")  # any size: resized inside
    assert description["input"]["shape"] == ["batch", 3, "height", "width"]
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(100, 90, 3), (64, 64, 3), (37, 50, 3), (130, 201, 3)]]
    assert check_parity(model, tmp_path / "any.onnx", images) < 1e-4
    description = export_onnx(model, tmp_path / "pinned.onnx", input_size=(100, 90))  # one size, static shapes
    assert description["input"]["shape"] == ["batch", 3, 100, 90]
    assert check_parity(model, tmp_path / "pinned.onnx", images[:1] * 2) < 1e-4


def test_export_refuses_heads_without_export_module_and_missing_onnx(registry, cli, tmp_path, monkeypatch):
    run = run_tiny(cli, tmp_path / "run", "--category", "tiny-a", "--no-report", "--set", "report-distance.exportable=false")
    result = cli("export", "--model", str(run / "tiny-a" / "model"), "--output", str(tmp_path / "x.onnx"))
    assert isinstance(result.exception, VadError) and "cannot be exported to ONNX" in str(result.exception)
    assert not (tmp_path / "x.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = cli("export", "--model", str(run / "tiny-a" / "model"))
    assert isinstance(result.exception, VadError) and "pip install" in str(result.exception)
    result = cli("export", "--model", str(run / "tiny-a" / "model"), "--format", "tflite")
    assert isinstance(result.exception, VadError) and "use onnx" in str(result.exception)


def test_predict_fails_only_when_nothing_could_be_scored(registry, cli, tmp_path):
    run = run_tiny(cli, tmp_path / "run", "--category", "tiny-a", "--no-report")
    (tmp_path / "bad.png").write_bytes(b"nope")
    result = cli("predict", "--model", str(run), str(tmp_path / "bad.png"))
    assert isinstance(result.exception, VadError) and "no image could be scored" in str(result.exception)
    result = cli("predict", "--model", str(run), str(tmp_path / "missing-folder"))
    assert isinstance(result.exception, VadError) and "no image found" in str(result.exception)
    result = cli("predict", "--model", str(tmp_path), str(tmp_path / "bad.png"))
    assert isinstance(result.exception, VadError) and "model.json" in str(result.exception)


def test_bench_sweeps_resumes_and_reports_failed_cells(registry, cli, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: tiny\ndevice: cpu\nthreshold: report-max\ndetectors: [report-distance]\nbackbones: [fake-backbone]\ncategories: [tiny-a, tiny-zzz]\n")
    result = cli("bench", "--grid", str(grid), "--output", str(tmp_path / "bench"))
    assert result.exit_code == SOME_FAILED, (result.output, result.exception)  # a cell failed: not a success
    with open(tmp_path / "bench" / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["done", "failed"]
    assert "tiny-zzz" in rows[1]["error"] and rows[0]["error"] == ""
    assert float(rows[0]["fit_s"]) >= 0 and float(rows[0]["predict_ms_per_image"]) > 0
    assert "image_auroc" in rows[0] and rows[0]["image_auroc"]
    assert "| report-distance |" in (tmp_path / "bench" / "bench.md").read_text()
    finished = tmp_path / "bench" / "cells" / "report-distance__none__fake-backbone__tiny-a" / "metrics.json"
    before = finished.stat().st_mtime_ns
    result = cli("bench", "--grid", str(grid), "--output", str(tmp_path / "bench"))
    assert result.exit_code == SOME_FAILED
    assert finished.stat().st_mtime_ns == before  # not rerun
    with open(tmp_path / "bench" / "bench.csv") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["cached", "failed"]


def test_bench_checks_every_cell_before_running_the_first(registry, cli, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "dataset: tiny\ndevice: cpu\nthreshold: report-max\ndetectors: [report-distance, no-such-detector]\n"
        "backbones: [fake-backbone]\ncategories: [tiny-a]\noptions: {report-distance: {no_such_option: 1}}\n"
    )
    result = cli("bench", "--grid", str(grid), "--output", str(tmp_path / "bench"))
    message = str(result.exception)
    assert isinstance(result.exception, VadError) and "nothing was run" in message
    assert "no-such-detector" in message and "no_such_option" in message
    assert not (tmp_path / "bench").exists()


def test_bench_grid_errors_are_clear(tmp_path):
    from vad.bench import load_grid

    with pytest.raises(VadError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")
    grid = tmp_path / "grid.yaml"
    for text, message in (
        ("detectors: [a]\ncategories: [x]\nbogus: 1\n", "unknown keys"),
        ("categories: [x]\n", "names no detector"),
        ("categories: [x]\ndetectors: [a]\ngroups: [{detectors: [b]}]\n", "inside each group, not at the top"),
        ("categories: [x]\ngroups: [{detectors: [b], categories: [y]}]\n", r"group 1 has keys \['categories'\]"),
        ("categories: [x]\ngroups: [{ensembles: [score-mean]}]\n", r"\(group 1\) names no detector"),
        ("categories: [x]\ngroups: []\n", "non-empty list"),
    ):
        grid.write_text(text)
        with pytest.raises(VadError, match=message):
            load_grid(grid)


def test_bench_grid_groups_are_crossed_one_by_one(tmp_path):
    from vad.bench import load_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "categories: [x, y]\ngroups:\n  - {detectors: [a], backbones: [b1, b2]}\n"
        "  - {detector: a, ensembles: [fuse, mix], backbones: [[b1, b2]]}\n"
    )
    _, cells = load_grid(grid)
    assert [cell.id for cell in cells] == [
        "a__none__b1__x", "a__none__b1__y", "a__none__b2__x", "a__none__b2__y",
        "a__fuse__b1+b2__x", "a__fuse__b1+b2__y", "a__mix__b1+b2__x", "a__mix__b1+b2__y",
    ]


def test_results_commands_do_not_import_torch():
    code = "import sys, typer, vad.results_cli as r; r.add_commands(typer.Typer()); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_demo_data_patchcore_run_report_predict_export(cli, tmp_path):
    """The issue's journey on real parts: demo data (brick), PatchCore on packaged lite0 weights,
    report + raw maps, then predict and an ONNX export (backbone + memory bank) with parity."""
    pytest.importorskip("vad_datasets")
    pytest.importorskip("vad_timm")
    pytest.importorskip("vad_patchcore")
    pytest.importorskip("onnxruntime")
    import tifffile

    run = tmp_path / "run"
    result = cli("run", "--detector", "patchcore", "--category", "brick", "--device", "cpu", "--save-maps", "--output", str(run))
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((run / "metrics.json").read_text())["categories"]["brick"]
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9
    for name in ("config.yaml", "results.csv", "results.md", "results.json", "report.html"):
        assert (run / name).is_file(), name
    with open(run / "brick" / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        path = Path(row["path"])
        tiff = run / "anomaly_maps" / "brick" / "test" / row["defect_type"] / (path.stem + ".tiff")
        saved = tifffile.imread(tiff)
        assert saved.dtype == np.float32 and saved.shape == decode_png(path).shape[:2]  # original size
    shot = screenshot(run / "report.html", tmp_path / "shot.png", tmp_path / "chromium-profile")
    saturation = shot.max(axis=2).astype(int) - shot.min(axis=2)
    assert (saturation > 100).mean() > 0.01, "no coloured heat maps visible in the screenshot"

    model = run / "brick" / "model"
    defective = [Path(r["path"]) for r in rows if r["label"] == "1"][:2]
    result = cli("predict", "--model", str(model), *map(str, defective))
    assert result.exit_code == 0, (result.output, result.exception)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    expected = {r["path"]: float(r["score"]) for r in rows}
    for record in records:
        assert record["score"] == pytest.approx(expected[record["path"]], rel=1e-5)

    onnx_file = tmp_path / "brick.onnx"
    # the demo images are 128 px: the graph resizes them to lite0's 224 px itself
    result = cli("export", "--model", str(model), "--output", str(onnx_file))
    assert result.exit_code == 0, (result.output, result.exception)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    images = np.stack([decode_png(path) for path in defective]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    onnx_scores, _ = session.run(None, {"images": np.ascontiguousarray(images)})
    assert np.abs(onnx_scores - [expected[str(p)] for p in defective]).max() < 1e-4


def test_train_count_chooses_nested_seeded_subsets_and_refuses_too_many(registry, cli, tmp_path):
    from vad.pipeline import chosen_training_images

    train = make_tiny_splits(train=8).train
    four, two = chosen_training_images(train, 4, 0, "tiny"), chosen_training_images(train[::-1], 2, 0, "tiny")
    assert [s.path for s in four[:2]] == [s.path for s in two]  # a larger count keeps a smaller one's images
    assert len({s.path for s in four}) == 4
    assert [s.path for s in chosen_training_images(train, 4, 1, "tiny")] != [s.path for s in four]  # the seed chooses
    with pytest.raises(VadError, match="more training images than the 8"):
        chosen_training_images(train, 9, 0, "tiny")
    for bad in (0, 2.5, True):
        with pytest.raises(VadError, match="whole number"):
            chosen_training_images(train, bad, 0, "tiny")

    folder = run_tiny(cli, tmp_path / "k3", "--category", "tiny-a", "--train-count", "3", "--no-report")
    written = json.loads((folder / "metrics.json").read_text())
    assert written["train_images"] == {"tiny-a": 3} and len(written["train_files"]["tiny-a"]) == 3
    result = cli("run", "--dataset", "tiny", "--backbone", "fake-backbone", "--detector", "report-distance", "--threshold", "report-max",
                 "--device", "cpu", "--category", "tiny-a", "--train-count", "999", "--output", str(tmp_path / "too-many"))
    assert isinstance(result.exception, VadError) and "train_count 999" in str(result.exception)
    assert not (tmp_path / "too-many").exists()


def test_bench_over_train_counts_writes_one_table_and_one_plot(registry, cli, tmp_path):
    from vad.bench import load_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text("dataset: tiny\ndevice: cpu\nthreshold: report-max\ndetectors: [report-distance]\nbackbones: [fake-backbone]\n"
                    "categories: [tiny-a]\ntrain_counts: [2, all]\n")
    result = cli("bench", "--grid", str(grid), "--output", str(tmp_path / "bench"))
    assert result.exit_code == 0, (result.output, result.exception)
    with open(tmp_path / "bench" / "bench.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["train_count"], r["status"]) for r in rows] == [("2", "done"), ("all", "done")]
    assert float(rows[0]["train_images"]) == 2 and float(rows[1]["train_images"]) > 2
    plot = decode_png(tmp_path / "bench" / "bench_train_count.png")
    assert plot.ndim == 3 and plot.shape[0] > 100
    grid.write_text("detectors: [a]\ncategories: [x]\ntrain_counts: [0]\n")
    with pytest.raises(VadError, match="train_counts takes whole numbers"):
        load_grid(grid)
    grid.write_text("detectors: [a]\ncategories: [x]\ntrain_counts: [1]\ntrain_count: 2\n")
    with pytest.raises(VadError, match="both train_count and train_counts"):
        load_grid(grid)
