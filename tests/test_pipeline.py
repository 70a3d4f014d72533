"""The pipeline end to end on the tiny in-memory data (fake backbone, template detector)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from vad.config import load_config
from vad.contracts import Sample
from vad.errors import VadError
from vad.images import BadImageError
from vad.build import build_model
from vad.model import AnomalyModel, resolve_device
from vad.pipeline import run
from vad.testing import make_tiny_splits
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402  (the template's detector, imported from its folder)


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(vad_template, name="template-under-test") as registry:
        yield registry


def read_scores(folder: Path) -> list[dict]:
    with open(folder / "scores.csv") as handle:
        return list(csv.DictReader(handle))


def test_run_writes_config_model_scores_and_tables(registry, tmp_path):
    folder, results = run(tiny_config(tmp_path, categories=[]), registry)
    assert [r.category for r in results] == ["tiny-a", "tiny-b"]
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["detectors"] == ["feature-distance"] and saved["output"] == str(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["categories"]["tiny-a"]["image_auroc"] == pytest.approx(1.0)
    assert metrics["categories"]["tiny-a"]["au_pro"] > 0.5
    assert set(metrics["mean"]) >= {"image_auroc", "pixel_auroc", "au_pro"}
    assert (folder / "results.csv").is_file() and (folder / "results.md").is_file()
    rows = read_scores(folder / "tiny-a")
    assert len(rows) == 12 and {r["decision"] for r in rows} <= {"0", "1"}
    assert (folder / "tiny-a" / "model" / "model.json").is_file()


def test_saved_model_is_reused_without_refitting(registry, tmp_path):
    first, _ = run(tiny_config(tmp_path), registry)
    model_file = first / "tiny-a" / "model" / "model.json"
    before = model_file.stat().st_mtime_ns
    second, _ = run(tiny_config(tmp_path, output=str(tmp_path / "again"), model=str(first)), registry)
    assert model_file.stat().st_mtime_ns == before
    assert not (second / "tiny-a" / "model").exists()
    assert [r["score"] for r in read_scores(first / "tiny-a")] == [r["score"] for r in read_scores(second / "tiny-a")]


def test_same_seed_same_scores(registry, tmp_path):
    a, _ = run(tiny_config(tmp_path, output=str(tmp_path / "a")), registry)
    b, _ = run(tiny_config(tmp_path, output=str(tmp_path / "b")), registry)
    assert read_scores(a / "tiny-a") == read_scores(b / "tiny-a")


def test_model_save_load_gives_the_same_outputs(registry, tmp_path):
    splits = make_tiny_splits()
    model = build_model(tiny_config(tmp_path), registry)
    model.fit(splits.train, splits.validation)
    model.save(tmp_path / "m", registry)
    loaded = AnomalyModel.load(tmp_path / "m", "cpu", registry)
    assert loaded.image_threshold == model.image_threshold
    for a, b in zip(model.predict(splits.test), loaded.predict(splits.test)):
        assert a.score == b.score and (a.map == b.map).all()


def test_f1_optimal_without_anomalous_validation_is_refused(registry, tmp_path):
    with pytest.raises(VadError, match=r"needs anomalous validation images.*normal-only data \(conformal, k-sigma, manual, max, (nfa, )?quantile\)"):
        run(tiny_config(tmp_path, threshold="f1-optimal"), registry)


def test_a_threshold_that_needs_no_scores_is_fitted_without_calibration(registry, tmp_path):
    train = make_tiny_splits().train
    model = build_model(tiny_config(tmp_path, threshold="manual", options={"manual": {"value": 3.5}}), registry)
    model.fit(train, [])
    assert (model.image_threshold, model.pixel_threshold) == (3.5, 3.5)
    assert model.calibration == {"method": "none", "scores": 0}


def test_several_detectors_need_an_ensemble(registry, tmp_path):
    with pytest.raises(VadError, match="need an ensemble"):
        build_model(tiny_config(tmp_path, detectors=["feature-distance", "patchcore"]), registry)


def test_empty_training_set_is_a_clear_error(registry, tmp_path):
    model = build_model(tiny_config(tmp_path), registry)
    with pytest.raises(VadError, match="training set is empty"):
        model.fit([], [])


def _corrupt(sample: Sample) -> Sample:
    def fail():
        raise BadImageError(sample.path, "truncated file")

    sample.image_loader = fail
    return sample


def test_bad_image_stops_with_its_name_or_is_skipped_and_listed(registry, tmp_path):
    splits = make_tiny_splits()
    splits.test[0] = _corrupt(splits.test[0])
    model = build_model(tiny_config(tmp_path), registry)
    model.fit(splits.train, splits.validation)
    with pytest.raises(VadError, match=r"memory://tiny/test/good/000.png.*--skip-bad"):
        list(model.predict(splits.test))
    model.skip_bad = True
    outputs = list(model.predict(splits.test))
    assert len(outputs) == len(splits.test) - 1
    assert [s.path for s in model.skipped] == [splits.test[0].path]


def test_device_resolution_errors():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(VadError, match="unknown device"):
        resolve_device("gpu0")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(VadError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_command_line_overrides_the_config_file(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("detectors: [padim]\nbatch_size: 4\noptions: {patchcore: {coreset_ratio: 0.5, seed: 1}}\n")
    config = load_config(str(file), {"batch_size": 2, "options": {"patchcore": {"coreset_ratio": 0.01}}, "device": None})
    assert config.detectors == ["padim"] and config.batch_size == 2
    assert config.options["patchcore"] == {"coreset_ratio": 0.01, "seed": 1}


def test_a_threshold_that_requires_a_score_kind_refuses_other_scores_and_score_ensembles():
    from types import SimpleNamespace

    from vad.build import check_score_kind

    class Rule:
        requires_scores = "-log10 NFA"

    def member(kind):
        return SimpleNamespace(detector=SimpleNamespace(score_kind=kind, describe_owner=lambda: "detector 'x'"))

    check_score_kind(Rule(), "nfa", [member("-log10 NFA")], None)  # the kind it needs
    check_score_kind(SimpleNamespace(requires_scores=None), "conformal", [member(None)], None)  # any scores
    with pytest.raises(VadError, match="detector 'x' gives ordinary anomaly scores"):
        check_score_kind(Rule(), "nfa", [member("-log10 NFA"), member(None)], None)
    with pytest.raises(VadError, match="score-level ensemble"):
        check_score_kind(Rule(), "nfa", [member("-log10 NFA"), member("-log10 NFA")], "mean")


def test_scores_csv_names_each_images_anomaly_kind_where_the_data_set_labels_kinds():
    """MVTec LOCO's structural / logical kinds go into scores.csv (vad bench compares ensembles
    per kind from it); data sets without kinds keep the plain columns."""
    import io

    from vad.model import Output
    from vad.pipeline import scores_csv

    samples = [Sample("good.png", 0, "c", "test", "good"), Sample("l.png", 1, "c", "test", "missing", anomaly_kind="logical")]
    outputs = [Output(sample, score, None, None) for sample, score in zip(samples, (0.1, 0.9))]
    rows = list(csv.DictReader(io.StringIO(scores_csv(outputs))))
    assert [(r["anomaly_kind"], r["label"], float(r["score"])) for r in rows] == [("", "0", 0.1), ("logical", "1", 0.9)]
    plain = scores_csv([Output(samples[0], 0.1, True, None)])
    assert plain.splitlines()[0] == "path,category,defect_type,label,score,decision" and plain.splitlines()[1].endswith(",1")
