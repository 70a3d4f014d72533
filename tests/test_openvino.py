"""OpenVINO export and scoring with exported graphs: parity with torch (float32 within 1e-4,
float16 weights close, INT8 convolutions of the feature source only), the same records from
`vad predict --runtime onnx|openvino` as from the model, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vad.errors import VadError


pytest.importorskip("openvino")


@pytest.fixture
def registry(report_registry):
    return report_registry


def fitted_model(registry, tmp_path, **changes):
    from vad.config import RunConfig
    from vad.model import AnomalyModel
    from vad.pipeline import run

    config = RunConfig(**{**dict(dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu",
                       categories=["tiny-a"], report=False, output=str(tmp_path / "run")), **changes})
    folder, _ = run(config, registry)
    return AnomalyModel.load(folder / "tiny-a" / "model", "cpu", registry), folder / "tiny-a" / "model"


@pytest.mark.parametrize("changes", [{}, {"roi": {"*": [[[32, 0], [64, 0], [64, 64], [32, 64]]]}}, {"image_size": [48, 48]}])
def test_openvino_scores_match_torch(registry, tmp_path, changes):
    from vad.export import check_parity, export_openvino, parity_images

    model, _ = fitted_model(registry, tmp_path, **changes)
    description = export_openvino(model, tmp_path / "model.xml")
    assert (tmp_path / "model.bin").is_file() and description["precision"] == "fp32"
    assert json.loads((tmp_path / "model.xml.json").read_text())["runtime"].startswith("OpenVINO")
    assert check_parity(model, tmp_path / "model.xml", parity_images(model)) < 1e-4
    export_openvino(model, tmp_path / "half.xml", precision="fp16")
    assert (tmp_path / "half.bin").stat().st_size < (tmp_path / "model.bin").stat().st_size
    scores = [o.score for o in model.predict([])] or [1.0]
    assert check_parity(model, tmp_path / "half.xml", parity_images(model)) < 1e-2 * max(1.0, abs(scores[0]))


def test_predict_with_an_exported_graph_gives_the_models_records(registry, tmp_path):
    from vad.cli import app
    from vad.export import export_onnx, export_openvino

    model, folder = fitted_model(registry, tmp_path)
    export_onnx(model, folder / "model.onnx")
    export_openvino(model, folder / "model.xml")
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (64 + 10 * index, 64, 3), dtype=np.uint8)).save(tmp_path / f"new{index}.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = {}
    for runtime in ("torch", "onnx", "openvino"):
        result = CliRunner().invoke(app, ["--quiet", "predict", str(tmp_path / "new*.png"), str(tmp_path / "broken.png"), "--model", str(folder), "--runtime", runtime])
        assert result.exit_code == 3, result.output  # the broken file is reported, the others scored
        records[runtime] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for runtime in ("onnx", "openvino"):
        for ours, theirs in zip(records[runtime], records["torch"]):
            assert ours["path"] == theirs["path"] and ours["anomalous"] == theirs["anomalous"] and (ours["error"] is None) == (theirs["error"] is None)
            if theirs["score"] is not None:
                assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4) and ours["map_max"] == pytest.approx(theirs["map_max"], abs=1e-3)


def test_clear_errors(registry, tmp_path):
    from vad.cli import app
    from vad.export import GraphSession, export_openvino

    model, folder = fitted_model(registry, tmp_path)
    with pytest.raises(VadError, match="offers fp32, fp16, int8"):
        export_openvino(model, tmp_path / "m.xml", precision="int4")
    with pytest.raises(VadError, match="written as a .xml"):
        export_openvino(model, tmp_path / "m.onnx")
    with pytest.raises(VadError, match="run `vad export` first"):
        GraphSession(tmp_path / "missing.xml")
    (tmp_path / "graph.pt").write_bytes(b"")
    with pytest.raises(VadError, match=".onnx file .* .xml file"):
        GraphSession(tmp_path / "graph.pt")
    for args, message in ((["--runtime", "tensorrt"], "use torch, onnx or openvino"), (["--graph", str(tmp_path / "x.onnx")], "use it with --runtime onnx or openvino")):
        result = CliRunner().invoke(app, ["--quiet", "predict", str(tmp_path), "--model", str(folder), *args])
        assert isinstance(result.exception, VadError) and message in str(result.exception)
    result = CliRunner().invoke(app, ["--quiet", "export", "--model", str(folder), "--precision", "fp16"])
    assert isinstance(result.exception, VadError) and "applies to --format openvino only" in str(result.exception)


def test_int8_quantises_the_feature_sources_convolutions_only(registry, tmp_path):
    import openvino

    from vad.cli import app
    from vad.export import GraphSession, INT8_OPERATIONS

    model, folder = fitted_model(registry, tmp_path)
    target = tmp_path / "int8" / "model.xml"
    # no --calibration: the training images of the run the model comes from
    result = CliRunner().invoke(app, ["--quiet", "export", "--model", str(folder), "--format", "openvino", "--precision", "int8", "--output", str(target)])
    assert result.exit_code == 0, result.output
    description = json.loads(target.with_name("model.xml.json").read_text())
    assert description["precision"] == "int8" and "calibrated on 8 normal images" in description["int8"], description.get("int8")
    graph = openvino.Core().read_model(str(target))
    quantised = [t.get_node() for op in graph.get_ordered_ops() if op.get_type_name() == "FakeQuantize" for o in op.outputs() for t in o.get_target_inputs()]
    assert quantised and all(node.get_type_name() in INT8_OPERATIONS and node.get_friendly_name().startswith("/features/") for node in quantised)
    # the head and the maps stay float32: normal images score as with torch (within 5 %);
    # activations beyond the normals' range are clipped, which lowers anomalous scores but
    # keeps every anomaly above every normal image here
    from vad.testing import make_tiny_splits

    test = make_tiny_splits("tiny-a", seed=0).test
    session = GraphSession(target)
    graph_scores = np.array([session(sample.load_image())[0] for sample in test])
    torch_scores = np.array([o.score for o in model.predict(test)])
    normal = np.array([sample.label == 0 for sample in test])
    assert np.abs(graph_scores - torch_scores)[normal].max() <= 0.05 * np.abs(torch_scores[normal]).max()
    assert graph_scores[~normal].min() > graph_scores[normal].max() and torch_scores[~normal].min() > torch_scores[normal].max()


def test_int8_calibration_errors_write_nothing(registry, tmp_path):
    import shutil

    from vad.cli import app
    from vad.export import export_openvino

    model, folder = fitted_model(registry, tmp_path)
    with pytest.raises(VadError, match="needs calibration images"):
        export_openvino(model, tmp_path / "m.xml", precision="int8")
    with pytest.raises(VadError, match="with --precision int8 only"):
        export_openvino(model, tmp_path / "m.xml", precision="fp16", calibration=[])
    with pytest.raises(VadError, match="must be 48x48 like the graph's pinned input, got 64x64"):
        export_openvino(model, tmp_path / "m.xml", precision="int8", input_size=(48, 48), calibration=[np.zeros((64, 64, 3), np.uint8)])
    alone = tmp_path / "copied-model"  # a model folder outside its run folder
    shutil.copytree(folder, alone)
    (tmp_path / "empty").mkdir()
    cases = (
        (["--model", str(alone), "--precision", "int8"], "not inside a run folder"),
        (["--model", str(folder), "--precision", "int8", "--calibration", str(tmp_path / "empty")], "matched no image"),
        (["--model", str(folder), "--precision", "fp16", "--calibration", str(tmp_path)], "calibrates --precision int8 only"),
    )
    for args, message in cases:
        result = CliRunner().invoke(app, ["--quiet", "export", "--format", "openvino", "--output", str(tmp_path / "out" / "m.xml"), *args])
        assert isinstance(result.exception, VadError) and message in str(result.exception), result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("m.*"))
