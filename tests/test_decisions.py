"""Decision-level evaluation: confusion matrices, the F1-optimal oracle, every rule refitted on
the same normal scores, the all-good baseline, and the tables a run writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from vad.decisions import BASELINE, ORACLE, best_f1_threshold, confusion, decision_table
from vad.pipeline import run
from vad.plugins import get_registry
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402  (the template's detector, imported from its folder)


def test_confusion_counts_and_undefined_ratios():
    scores, labels = np.array([0.1, 0.4, 0.6, 0.9, 0.95]), np.array([0, 0, 1, 0, 1])
    row = confusion(scores, labels, 0.5)
    assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (2, 1, 2, 0)
    assert row["precision"] == pytest.approx(2 / 3) and row["recall"] == 1.0
    assert row["f1"] == pytest.approx(0.8) and row["accuracy"] == pytest.approx(0.8) and row["false_alarm_rate"] == pytest.approx(1 / 3)
    nothing = confusion(scores, labels, None)
    assert nothing["precision"] is None and nothing["recall"] == 0 and nothing["accuracy"] == pytest.approx(0.6)
    only_good = confusion(scores[[0, 1]], labels[[0, 1]], 0.5)
    assert only_good["recall"] is None and only_good["false_alarm_rate"] == 0


def test_best_f1_threshold_is_the_brute_force_optimum_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scores = rng.integers(0, 8, 25).astype(float)  # many ties
        labels = (rng.random(25) < 0.4).astype(int)
        labels[0] = 1
        best = max(confusion(scores, labels, t)["f1"] for t in np.unique(scores))
        threshold = best_f1_threshold(scores, labels)
        assert confusion(scores, labels, threshold)["f1"] == pytest.approx(best)
        assert threshold == max(t for t in np.unique(scores) if confusion(scores, labels, t)["f1"] == pytest.approx(best))


def test_every_normal_rule_is_refitted_on_the_same_normals_and_warnings_stay_in_the_table(capsys):
    normals = np.linspace(0.0, 1.0, 10)
    model = SimpleNamespace(image_threshold=0.5, threshold_name="manual", normal_calibration_scores=normals)
    scores, labels = np.array([0.2, 0.8, 1.2, 3.0]), np.array([0, 0, 1, 1])
    rows = decision_table(model, scores, labels, get_registry())
    assert rows["chosen: manual"]["threshold"] == 0.5
    assert rows["max"]["threshold"] == pytest.approx(np.nextafter(1.0, 2.0))
    assert rows["quantile"]["threshold"] == pytest.approx(np.quantile(normals, 0.99))
    assert rows["k-sigma"]["threshold"] == pytest.approx(normals.mean() + 3 * normals.std())
    assert "k-sigma threshold fitted on 10 normal scores" in rows["k-sigma"]["note"]
    assert "f1-optimal" not in rows  # it needs anomalous calibration images: only the test-label oracle row
    assert rows[ORACLE]["f1"] == 1.0 and rows[ORACLE]["threshold"] == 1.2
    assert rows[BASELINE]["accuracy"] == 0.5 and rows[BASELINE]["tp"] == 0
    assert "warning" not in capsys.readouterr().err


def test_without_calibration_scores_or_anomalies_only_what_can_be_said_is_said():
    model = SimpleNamespace(image_threshold=None, threshold_name=None, normal_calibration_scores=np.zeros(0))
    rows = decision_table(model, np.array([0.1, 0.2]), np.array([0, 0]), get_registry())
    assert list(rows) == [BASELINE]
    assert rows[BASELINE]["accuracy"] == 1.0 and rows[BASELINE]["false_alarm_rate"] == 0


def test_a_run_writes_the_decisions_to_metrics_tables_and_report(vad_fakes, register_plugin, tmp_path):
    with register_plugin(vad_template, name="template-under-test") as registry:
        folder, _ = run(tiny_config(tmp_path, report=True), registry)
    decisions = json.loads((folder / "metrics.json").read_text())["decisions"]["tiny-a"]
    assert list(decisions)[0] == "chosen: max" and {"quantile", "k-sigma", "conformal", ORACLE, BASELINE} <= set(decisions)
    scores_csv = (folder / "tiny-a" / "scores.csv").read_text().splitlines()[1:]
    flagged = sum(line.endswith(",1") for line in scores_csv)
    assert decisions["chosen: max"]["tp"] + decisions["chosen: max"]["fp"] == flagged
    assert "| tiny-a | chosen: max |" in (folder / "decisions.md").read_text()
    assert (folder / "decisions.csv").read_text().startswith("category,rule,threshold,tp,fp,tn,fn,")
    assert "<h3>Decisions</h3>" in (folder / "report.html").read_text()


def test_a_shot_is_flagged_when_any_view_is_and_anomalous_when_any_view_shows_an_anomaly():
    from vad.decisions import shot_tables

    def view(name, images, threshold):
        return {"view": name, "images": images, "decisions": {"chosen: max": {"threshold": threshold}, BASELINE: {"threshold": None}}}

    views = {
        "machine/A": view("A", [("a/test/good/s1.png", 0, 0.2), ("a/test/cut/s2.png", 1, 0.9), ("a/test/good/s3.png", 0, 0.6)], 0.5),
        "machine/B": view("B", [("b/test/good/s1.png", 0, 0.1), ("b/test/good/s2.png", 0, 0.1), ("b/test/good/s3.png", 0, 0.1)], 0.5),
        "other/A": view("A", [("x/s1.png", 0, 0.0)], 1.0),  # a machine of one view: no shot table
    }
    tables, problems = shot_tables(views)
    assert list(tables) == ["machine"] and not problems
    chosen = tables["machine"]["chosen: max"]
    assert (chosen["tp"], chosen["fp"], chosen["tn"], chosen["fn"]) == (1, 1, 1, 0)  # s2 found, s3 a false alarm (view A)
    assert tables["machine"][BASELINE]["accuracy"] == pytest.approx(2 / 3)
    views["machine/B"]["images"].append(("b/test/cut/s1.png", 1, 0.9))
    tables, problems = shot_tables(views)
    assert not tables and "s1 in machine/B" in problems["machine"]


def test_a_multi_view_run_writes_decisions_per_shot(tmp_path):
    import importlib.util

    from vad.config import RunConfig

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "line_clearance_data.py"
    spec = importlib.util.spec_from_file_location("line_clearance_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = module.build(tmp_path / "data", size=64, train=6, good=3, anomalous=3)
    config = RunConfig(
        dataset="multi-view", root=str(root), detectors=["patchcore"], backbones=["tf_efficientnet_lite0"], image_size=[64, 64],
        report=True, output=str(tmp_path / "run"), device="cpu", roi=module.roi_polygons(64), registration="translation",
    )
    folder, results = run(config)
    assert sorted(r.category for r in results) == ["machine/A", "machine/B", "machine/C"]
    shots = json.loads((folder / "metrics.json").read_text())["shot_decisions"]["machine"]
    chosen = next(values for rule, values in shots.items() if rule.startswith("chosen"))
    assert chosen["tp"] + chosen["fn"] == 3 and chosen["fp"] + chosen["tn"] == 3
    assert shots[BASELINE]["accuracy"] == 0.5
    assert "| machine | chosen:" in (folder / "shot_decisions.md").read_text()
    assert "Shots of machine" in (folder / "report.html").read_text()
