"""Experiment tracking: ``vad run --track mlflow`` (and every ``vad bench`` cell of a grid that
sets ``track: mlflow``) logs the run to MLflow once its folder is complete.

One MLflow run per vad run, named after the run folder (a bench cell's folder is its cell id),
in the experiment ``tracking_experiment`` (``vad``), with:

* parameters: the resolved configuration (``config.yaml``), nested keys dotted
  (``options.patchcore.coreset_ratio``), lists as JSON;
* metrics: every number of ``metrics.json`` per category (``<category>/<metric>``), their mean
  (``mean/<metric>``), timings and thresholds, and the decision table's rows
  (``<category>/decisions/<rule>/<column>``);
* tags: vad's version, data set, detectors, the run folder and the folder holding it;
* artifacts: the run folder's tables, ``metrics.json``, ``config.yaml``, ``report.html`` and the
  per-category reports; fitted models and raw maps stay in the run folder (its path is a tag).

``tracking_uri`` picks the store (any MLflow tracking URI: a server, ``databricks``, a database);
by default a local SQLite database ``mlflow.db`` with artifacts under ``mlruns/``, both in the
working directory (MLflow 3's own default: its plain-file store is retired). The URI is checked
before the run starts; a failure to log afterwards is a warning, never a lost run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vad.errors import VadError

TRACKERS = ("mlflow",)
DEFAULT_URI = "sqlite:///mlflow.db"
#: Files and folders of a run folder not sent as artifacts (large or rebuilt from the rest).
NOT_ARTIFACTS = {"model", "checkpoints", "anomaly_maps"}


def require_mlflow() -> Any:
    """Import ``mlflow`` or say how to install it."""
    try:
        import mlflow
    except ImportError as error:
        raise VadError("--track mlflow needs MLflow: pip install 'vad-core[tracking]' (mlflow-skinny, with SQLAlchemy for the local store)") from error
    return mlflow


def check_tracking(track: str | None, uri: str | None) -> None:
    """A clear error before the run for an unknown tracker, a missing MLflow or a bad URI."""
    if track is None:
        return
    if track not in TRACKERS:
        raise VadError(f"--track {track!r}: vad tracks with {', '.join(TRACKERS)}")
    require_mlflow()
    target = uri or DEFAULT_URI
    if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
        raise VadError(f"--tracking-uri {target!r} is not a URI (e.g. sqlite:///mlflow.db, http://host:5000, databricks)")
    if target.startswith("sqlite:"):
        import importlib.util

        if importlib.util.find_spec("sqlalchemy") is None or importlib.util.find_spec("alembic") is None:
            raise VadError(f"the tracking store {target} needs SQLAlchemy and Alembic: pip install 'vad-core[tracking]'")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys; lists and other values as they are."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _metric_name(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / :`` and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./: ]", "_", name)


def run_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a ``metrics.json`` as flat MLflow metrics."""
    found: dict[str, float] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf"):
            found[_metric_name(name)] = float(value)

    for category, values in (metrics.get("categories") or {}).items():
        for key, value in values.items():
            add(f"{category}/{key}", value)
    for key, value in (metrics.get("mean") or {}).items():
        add(f"mean/{key}", value)
    for section in ("timings", "thresholds"):
        for category, values in (metrics.get(section) or {}).items():
            for key, value in (values or {}).items():
                add(f"{category}/{section}/{key}", value)
    for category, rules in (metrics.get("decisions") or {}).items():
        for rule, row in rules.items():
            for column, value in row.items():
                add(f"{category}/decisions/{rule}/{column}", value)
    return found


def log_run(folder: Path, config: Any) -> str:
    """Log the complete run folder ``folder`` to the tracker ``config.track``; returns the run id."""
    mlflow = require_mlflow()
    import vad

    client_uri = config.tracking_uri or DEFAULT_URI
    mlflow.set_tracking_uri(client_uri)
    mlflow.set_experiment(config.tracking_experiment)
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    params = {key: (json.dumps(value) if isinstance(value, (list, tuple)) else value) for key, value in flatten(config.to_dict()).items()}
    with mlflow.start_run(run_name=folder.name) as active:
        mlflow.set_tags({
            "vad.version": vad.__version__, "vad.dataset": config.dataset, "vad.detectors": ",".join(config.detectors),
            "vad.run_folder": str(folder.resolve()), "vad.parent_folder": folder.resolve().parent.name,
        })
        mlflow.log_params({key: str(value)[:6000] for key, value in params.items()})
        mlflow.log_metrics(run_metrics(metrics))
        for path in sorted(folder.iterdir()):
            if path.name in NOT_ARTIFACTS or path.name.startswith("."):
                continue
            if path.is_file():
                mlflow.log_artifact(str(path))
            else:
                for file in sorted(path.rglob("*")):
                    if file.is_file() and not NOT_ARTIFACTS.intersection(file.relative_to(folder).parts):
                        mlflow.log_artifact(str(file), str(file.parent.relative_to(folder)))
        return active.info.run_id
