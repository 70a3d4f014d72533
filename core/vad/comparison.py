"""Does an ensemble beat its best member? Answered per category from ``vad bench`` rows.

An ensemble's members are the rows with no ensemble whose detector is one of the ensemble's
detectors and whose backbone is one of its backbones (``patchcore / pca-global / lite0+lite2``
has members ``patchcore / none / lite0`` and ``patchcore / none / lite2``). Per category the best
member is the one with the highest image AUROC there; the ensemble's difference to it gets a
95 % paired bootstrap interval: test images resampled with replacement, the same draw for both,
normals and anomalies drawn separately so every draw has both, ``RESAMPLES`` draws. The verdict
is "wins" or "loses" only when the interval excludes 0. Over several categories the mean
difference gets the same interval, each category's images resampled on their own in every
draw, against the member best in the mean. Where the data set labels anomaly kinds
(MVTec LOCO: structural, logical), each kind gets the same comparison on the good images and
that kind's anomalies, against the member best on that kind.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 2000


def auroc(labels: Any, scores: Any) -> float:
    """Image AUROC by the Mann-Whitney statistic (ties count one half); ``labels`` true (1) for anomalous."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
    positive, negative = scores[labels], scores[~labels]
    return float((positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean())


def paired_bootstrap(labels: np.ndarray, first: np.ndarray, second: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """AUROC(first) - AUROC(second) on the same images and its 95 % percentile interval."""
    return paired_bootstrap_mean([(labels, first, second)], resamples, seed)


def paired_bootstrap_mean(
    sets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """The mean over ``sets`` (``(labels, first, second)``, e.g. one per category) of
    AUROC(first) - AUROC(second) and its 95 % percentile interval, each set's images resampled
    on their own in every draw (normals and anomalies apart)."""
    rng = np.random.default_rng(seed)
    differences = np.zeros(resamples)
    for labels, first, second in sets:
        normals, anomalies = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
        for draw in range(resamples):
            picked = np.concatenate([rng.choice(normals, normals.size), rng.choice(anomalies, anomalies.size)])
            differences[draw] += auroc(labels[picked], first[picked]) - auroc(labels[picked], second[picked])
    differences /= len(sets)
    low, high = np.percentile(differences, [2.5, 97.5])
    observed = float(np.mean([auroc(labels, first) - auroc(labels, second) for labels, first, second in sets]))
    return observed, float(low), float(high)


def cell_scores(cell_folder: Path, category: str) -> dict[str, tuple[int, float, str]]:
    """A cell's test images: ``{path: (label, score, anomaly kind or "")}`` from its ``scores.csv``."""
    with open(cell_folder / category / "scores.csv", newline="") as handle:
        return {line["path"]: (int(line["label"]), float(line["score"]), line.get("anomaly_kind") or "") for line in csv.DictReader(handle)}


def members_of(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The member rows of an ensemble row on the same category (module docstring)."""
    return [
        other for other in rows
        if other["ensemble"] == "none" and other["category"] == row["category"] and other["status"] != "failed"
        and other["detector"] in row["detector"].split("+") and other["backbone"] in row["backbone"].split("+")
        and (other["detector"], other["backbone"]) != (row["detector"], row["backbone"])
    ]


def _record(row: dict[str, Any], category: str, kind: str, sets: list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]) -> dict[str, Any]:
    """One ensemble against the member with the best mean AUROC over ``sets`` (``(labels,
    ensemble scores, {member: scores})`` on the same images, one per category)."""
    def mean_auroc(pick: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]) -> float:
        return float(np.mean([auroc(labels, pick(ours, theirs)) for labels, ours, theirs in sets]))

    member_aurocs = {name: mean_auroc(lambda ours, theirs, name=name: theirs[name]) for name in sets[0][2]}
    best = max(member_aurocs, key=lambda name: member_aurocs[name])
    difference, low, high = paired_bootstrap_mean([(labels, ours, theirs[best]) for labels, ours, theirs in sets])
    return {
        "detector": row["detector"], "ensemble": row["ensemble"], "backbone": row["backbone"], "category": category, "kind": kind,
        "image_auroc": mean_auroc(lambda ours, theirs: ours), "best_member": best, "member_image_auroc": member_aurocs[best],
        "difference": difference, "low": low, "high": high,
        "verdict": "wins" if low > 0 else "loses" if high < 0 else "no clear difference",
    }


def against_members(rows: Sequence[dict[str, Any]], folder_of: Callable[[dict[str, Any]], Path]) -> list[dict[str, Any]]:
    """One record per ensemble row with at least two members (``kind`` "all"): its best member
    and the paired bootstrap of the difference; where the test images name anomaly kinds, one
    more record per kind, on the good images and that kind's anomalies, against the member best
    on them. An ensemble compared on several categories also gets records with category
    "mean": the mean over the categories against the member best in the mean, each category's
    images resampled on their own. ``folder_of(row)`` is the row's cell folder."""
    records = []
    # (detector, ensemble, backbone) -> kind -> category -> (labels, ensemble scores, {member: scores})
    compared: dict[tuple[str, str, str], dict[str, dict[str, tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]]] = {}
    for row in rows:
        if row["ensemble"] == "none" or row["status"] == "failed" or not isinstance(row.get("image_auroc"), (int, float)):
            continue
        members = [m for m in members_of(row, rows) if isinstance(m.get("image_auroc"), (int, float))]
        if len(members) < 2:
            continue
        ours = cell_scores(folder_of(row), row["category"])
        theirs = {f"{m['detector']} / {m['backbone']}": cell_scores(folder_of(m), m["category"]) for m in members}
        if any(set(scores) != set(ours) for scores in theirs.values()):
            continue  # not scored on the same test images: no paired comparison
        paths = sorted(ours)
        labels, kinds = np.array([ours[p][0] for p in paths]), np.array([ours[p][2] for p in paths])
        if labels.all() or not labels.any():
            continue
        subsets = [("all", np.ones(len(paths), bool))]
        subsets += [(kind, (labels == 0) | (kinds == kind)) for kind in sorted(set(kinds[labels == 1]) - {""})]
        for kind, chosen in subsets:
            scored = (labels[chosen], np.array([ours[p][1] for p in paths])[chosen], {name: np.array([scores[p][1] for p in paths])[chosen] for name, scores in theirs.items()})
            records.append(_record(row, row["category"], kind, [scored]))
            compared.setdefault((row["detector"], row["ensemble"], row["backbone"]), {}).setdefault(kind, {})[row["category"]] = scored
    for (detector, ensemble, backbone), by_kind in compared.items():
        for kind, by_category in by_kind.items():
            members = {frozenset(theirs) for _, _, theirs in by_category.values()}
            if len(by_category) > 1 and len(members) == 1:
                row = {"detector": detector, "ensemble": ensemble, "backbone": backbone}
                records.append(_record(row, "mean", kind, list(by_category.values())))
    return records


#: What :func:`table` shows of a record.
COLUMNS = ["row", "detector", "ensemble", "features", "category", "anomalies", "ensemble", "best member", "difference [95 % CI]", "verdict"]
NOTE = f"Ensemble against its best member (image AUROC; 95 % paired bootstrap interval, {RESAMPLES} resamples; row = the plot's row)"


def table(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The records as table rows (:data:`COLUMNS`), numbered as the plot's rows."""
    return [
        [
            str(row), r["detector"], r["ensemble"], r["backbone"], r["category"], r.get("kind", "all"), f"{r['image_auroc']:.3f}",
            f"{r['best_member']} {r['member_image_auroc']:.3f}", f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]", r["verdict"],
        ]
        for row, r in enumerate(records, 1)
    ]


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """The records as a Markdown table."""
    lines = [NOTE, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table(records)]
    return "\n".join(lines) + "\n"


def plot_png(records: Sequence[dict[str, Any]]) -> bytes:
    """The records' differences and intervals as a forest plot (rows numbered as in :func:`markdown`)."""
    from vad.report import intervals_png

    return intervals_png(
        [r["difference"] for r in records], [r["low"] for r in records], [r["high"] for r in records],
        "ensemble minus its best member", "image AUROC difference (95 % paired bootstrap interval)",
    )
