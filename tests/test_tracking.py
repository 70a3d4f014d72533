"""--track mlflow: a finished run (and each bench cell) becomes an MLflow run with the config as
parameters, every metric, and the tables and report as artifacts; bad settings fail before the
run, a failing tracker never loses the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from vad.config import RunConfig
from vad.errors import VadError
from vad.pipeline import run


mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def registry(report_registry):
    return report_registry


def config(tmp_path: Path, **changes) -> RunConfig:
    base = dict(dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu",
                categories=["tiny-a"], report=True, output=str(tmp_path / "run"), track="mlflow", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return RunConfig(**{**base, **changes})


def test_a_finished_run_is_logged_with_config_metrics_and_report(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts go to ./mlruns
    folder, results = run(config(tmp_path), registry)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (logged,) = client.search_runs([client.get_experiment_by_name("vad").experiment_id])
    assert logged.info.run_name == "run" and logged.data.tags["vad.run_folder"] == str(folder.resolve())
    assert logged.data.params["detectors"] == '["report-distance"]' and logged.data.params["threshold"] == "report-max"
    assert logged.data.metrics["tiny-a/image_auroc"] == pytest.approx(results[0].metrics["image_auroc"])
    assert "mean/image_auroc" in logged.data.metrics and "tiny-a/timings/fit_s" in logged.data.metrics
    assert any(key.startswith("tiny-a/decisions/chosen: report-max/") for key in logged.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"metrics.json", "config.yaml", "results.md", "report.html", "decisions.md", "tiny-a"} <= artifacts
    assert not any(a.path.endswith("model") for a in client.list_artifacts(logged.info.run_id, "tiny-a"))


def test_bad_tracking_settings_fail_before_the_run_and_a_failing_tracker_keeps_the_run(registry, tmp_path, monkeypatch, capsys):
    with pytest.raises(VadError, match="vad tracks with mlflow"):
        run(config(tmp_path, track="wandb"), registry)
    with pytest.raises(VadError, match="is not a URI"):
        run(config(tmp_path, tracking_uri="just a folder"), registry)
    assert not (tmp_path / "run").exists()
    import vad.pipeline

    def broken(folder, config):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(vad.pipeline, "log_run", broken)
    folder, _ = run(config(tmp_path), registry)
    assert '"complete"' in (folder / "run.json").read_text()
    assert "logging it to mlflow failed: ConnectionError: tracking server unreachable" in " ".join(capsys.readouterr().err.split())


def test_each_bench_cell_is_a_run(registry, tmp_path, monkeypatch):
    from vad.bench import run_bench

    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "dataset: tiny\ndevice: cpu\nthreshold: report-max\nbackbones: [fake-backbone]\ndetectors: [report-distance]\n"
        f"categories: [tiny-a, tiny-b]\ntrack: mlflow\ntracking_uri: sqlite:///{tmp_path}/mlflow.db\n"
    )
    run_bench(grid, tmp_path / "bench", registry)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vad").experiment_id])
    assert sorted(r.data.tags["vad.parent_folder"] for r in runs) == ["cells", "cells"]
    assert len({r.info.run_name for r in runs}) == 2
