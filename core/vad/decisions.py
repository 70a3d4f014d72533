"""Decision-level evaluation (seed 001's tables): what each threshold rule decides on the test
images, against the trivial inspector that calls every part good.

AUROC ranks scores; a production line acts on decisions. For one category this compares, on the
same test images:

* the model's own threshold (the rule the run chose, ``chosen: <rule>``);
* every other registered rule that is fitted on normal scores alone (max, quantile, k-sigma,
  conformal, ... with the run's options for them), refitted on the *same* normal calibration
  scores the model's threshold was fitted on, so the rules differ only in the rule;
* ``f1-optimal on test labels``: the threshold with the best F1 on the test images themselves,
  an upper bound no deployed rule can reach (it reads the answers), shown to size the gap;
* ``all good (baseline)``: no part is ever flagged; its accuracy is the share of good parts, the
  number a rule has to beat before its accuracy means anything.

Each row holds the threshold, the confusion matrix (``tp`` anomalous parts flagged, ``fp`` good
parts flagged, ``tn``, ``fn``), precision, recall, F1, accuracy and the false-alarm rate; a ratio
whose denominator is 0 is None. Warnings a rule gives while refitted (few scores for k-sigma)
are kept in its row's ``note`` rather than printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vad.errors import VadError
from vad.progress import collected_warnings

if TYPE_CHECKING:
    from vad.model import AnomalyModel
    from vad.plugins import Registry

ORACLE = "f1-optimal on test labels"
BASELINE = "all good (baseline)"
COLUMNS = ["threshold", "tp", "fp", "tn", "fn", "precision", "recall", "f1", "accuracy", "false_alarm_rate"]


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """The decisions ``score >= threshold`` (None: nothing flagged) against ``labels`` (1 anomalous)."""
    flagged = np.zeros(scores.shape, bool) if threshold is None else scores >= threshold
    anomalous = labels.astype(bool)
    tp, fp = int((flagged & anomalous).sum()), int((flagged & ~anomalous).sum())
    tn, fn = int((~flagged & ~anomalous).sum()), int((~flagged & anomalous).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "threshold": None if threshold is None else float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, labels.size),
        "false_alarm_rate": _ratio(fp, fp + tn),
    }


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold ``t`` (one of the scores) whose decisions ``score >= t`` have the best F1;
    among equal F1 the highest. ``labels`` must hold an anomaly."""
    order = np.argsort(-scores, kind="stable")
    ranked, anomalous = scores[order], labels[order].astype(bool)
    tp, fp = np.cumsum(anomalous), np.cumsum(~anomalous)
    last_of_value = np.r_[ranked[1:] != ranked[:-1], True]  # flagging down to a value flags all its ties
    f1 = np.where(last_of_value, 2 * tp / (2 * tp + fp + (anomalous.sum() - tp)), -1.0)
    return float(ranked[int(np.argmax(f1))])


def decision_table(
    model: AnomalyModel, scores: np.ndarray, labels: np.ndarray, registry: Registry, options_for: Any = lambda name: {}
) -> dict[str, dict[str, Any]]:
    """One row per rule (module docstring) for the test ``scores`` and ``labels``; ``options_for``
    gives the run's options of a rule by name."""
    rows: dict[str, dict[str, Any]] = {}
    if model.image_threshold is not None:
        rows[f"chosen: {model.threshold_name}"] = confusion(scores, labels, model.image_threshold)
    normals = np.asarray(model.normal_calibration_scores, dtype=np.float64)
    for name, entry in sorted(registry.entries("thresholds").items()):
        if name == model.threshold_name or normals.size == 0:
            continue
        cls = entry.load()
        if not cls.needs_validation or cls.needs_anomalous or normals.size < cls.min_scores:
            continue
        with collected_warnings() as notes:
            try:
                threshold = float(cls(**options_for(name)).fit(normals, np.zeros(normals.size, np.int64)))
            except VadError as error:  # a rule that needs options or more scores than there are
                notes.append(str(error))
                threshold = None
        if threshold is not None:
            rows[name] = confusion(scores, labels, threshold)
        if notes:
            rows.setdefault(name, {key: None for key in COLUMNS})["note"] = " ".join(notes)
    if labels.any():
        rows[ORACLE] = confusion(scores, labels, best_f1_threshold(scores, labels))
    rows[BASELINE] = confusion(scores, labels, None)
    return rows


# --------------------------------------------------------------------------- shots of several views


def machine_of(category: str, view: str) -> str:
    """The machine (product) a view's category belongs to: ``machine/A`` -> ``machine``; a flat
    view ``A`` -> ``""`` (the data set root is one machine)."""
    return category[: -len(view)].rstrip("/") if category.endswith(view) else category


def shot_tables(views: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """Decisions per shot: every view of a machine photographs the same shot, matched by file
    name (``shot_017.png`` in each view's test folders); a shot is anomalous when any view shows
    an anomaly and flagged when any view's score reaches that view's threshold of the rule.

    ``views``: per category with views, ``{"view", "images": [(path, label, score)], "decisions":
    {rule: row}}``. Returns ``{machine: {rule: row}}`` for the rules every view of the machine
    has (the baseline included), and ``{machine: why}`` for machines whose shots cannot be matched.
    """
    machines: dict[str, list[str]] = {}
    for category, view in views.items():
        machines.setdefault(machine_of(category, view["view"]), []).append(category)
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    problems: dict[str, str] = {}
    for machine, categories in machines.items():
        if len(categories) < 2:
            continue
        shots: dict[str, dict[str, tuple[int, float]]] = {}
        repeated = []
        for category in categories:
            for path, label, score in views[category]["images"]:
                stem = Path(path).stem
                if category in shots.setdefault(stem, {}):
                    repeated.append(f"{stem} in {category}")
                shots[stem][category] = (int(label), float(score))
        if repeated:
            problems[machine or "(root)"] = (
                "shots are matched across views by file name, but names repeat within a view ("
                + ", ".join(repeated[:3]) + "): name each shot's image the same in every view and differently from the other shots"
            )
            continue
        names = sorted(shots)
        labels = np.array([max(label for label, _ in shots[name].values()) for name in names])
        rules = [rule for rule in views[categories[0]]["decisions"] if all(rule in views[c]["decisions"] for c in categories)]
        table: dict[str, dict[str, Any]] = {}
        for rule in rules:
            thresholds = {c: views[c]["decisions"][rule].get("threshold") for c in categories}
            flagged = np.array([
                any(thresholds[c] is not None and score >= thresholds[c] for c, (_, score) in shots[name].items()) for name in names
            ])
            # Reuse the image-level confusion: a flagged shot scores 1 against the threshold 1.
            row = confusion(flagged.astype(float), labels, 1.0 if rule != BASELINE else None)
            row["threshold"] = None
            table[rule] = row
        tables[machine or "(root)"] = table
    return tables, problems
