#!/usr/bin/env python
"""One Markdown table from one or more ``vad bench`` folders: a row per configuration
(detector, fusion, features), image AUROC / pixel AUROC / AU-PRO per category, their means, and
the mean fit time per category and prediction time per image. Failed cells are left out.

Then, for every ensemble whose members also ran alone (fusion ``none``, each detector and
backbone of the ensemble), a second table answers "does the ensemble beat its best member?" per
category: the member with the highest image AUROC on that category, the ensemble's difference to
it, and the 95 % paired bootstrap interval of that difference (test images resampled with
replacement, the same draw for both, ``RESAMPLES`` draws, normals and anomalies resampled
separately so every draw has both). The verdict is "wins" or "loses" only when the interval
excludes 0.

    vad bench --grid benchmarks/grids/members.yaml --output runs/bench-members
    python benchmarks/grids/summary.py runs/bench-members runs/bench-fusion ...
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ACCURACY = ("image_auroc", "pixel_auroc", "au_pro")
RESAMPLES = 2000


def number(value) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.3f}"


def mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return statistics.fmean(values) if values else None


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image AUROC (ties count half)."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    return float((positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean())


def paired_bootstrap(labels: np.ndarray, first: np.ndarray, second: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """AUROC(first) - AUROC(second) on the same images, and its 95 % percentile interval over
    ``RESAMPLES`` paired resamples (normals and anomalies drawn separately)."""
    rng = np.random.default_rng(seed)
    normals, anomalies = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    differences = np.empty(RESAMPLES)
    for draw in range(RESAMPLES):
        picked = np.concatenate([rng.choice(normals, normals.size), rng.choice(anomalies, anomalies.size)])
        differences[draw] = auroc(labels[picked], first[picked]) - auroc(labels[picked], second[picked])
    low, high = np.percentile(differences, [2.5, 97.5])
    return auroc(labels, first) - auroc(labels, second), float(low), float(high)


def test_scores(folder: Path, row: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A cell's test images (paths), labels and scores, from its ``scores.csv``."""
    with open(folder / "cells" / row["cell"] / row["category"] / "scores.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    return [line["path"] for line in lines], np.array([int(line["label"]) for line in lines]), np.array([float(line["score"]) for line in lines])


def versus_members(configs: dict[tuple[str, str, str], dict[str, dict]], categories: list[str]) -> None:
    """The "does the ensemble beat its best member?" table (module docstring)."""
    lines = []
    for (detector, fusion, features), by_category in configs.items():
        if fusion == "none":
            continue
        members = [
            key for key in configs
            if key[1] == "none" and key[0] in detector.split("+") and key[2] in features.split("+") and key != (detector, fusion, features)
        ]
        if len(members) < 2:
            continue
        for category in categories:
            if category not in by_category or any(category not in configs[m] for m in members):
                continue
            paths, labels, scores = test_scores(*by_category[category]["_source"])
            best = max(members, key=lambda m: configs[m][category]["image_auroc"])
            member_paths, _, member_scores = test_scores(*configs[best][category]["_source"])
            order = {path: index for index, path in enumerate(member_paths)}
            if set(order) != set(paths):
                raise SystemExit(f"{detector}/{fusion}/{features} and its member {best} scored different test images on {category}")
            difference, low, high = paired_bootstrap(labels, scores, member_scores[[order[p] for p in paths]])
            verdict = "wins" if low > 0 else "loses" if high < 0 else "no clear difference"
            lines.append(
                f"| {detector} | {fusion} | {features} | {category} | {number(auroc(labels, scores))} | {'/'.join(best)} "
                f"{number(configs[best][category]['image_auroc'])} | {difference:+.3f} [{low:+.3f}, {high:+.3f}] | {verdict} |"
            )
    if lines:
        print()
        print(f"Ensemble against its best member (image AUROC; 95 % paired bootstrap interval, {RESAMPLES} resamples):")
        print()
        print("| detector | fusion | features | category | ensemble | best member | difference [95 % CI] | verdict |")
        print("|" + "---|" * 8)
        print("\n".join(lines))


def main(folders: list[str]) -> None:
    configs: dict[tuple[str, str, str], dict[str, dict]] = {}
    categories: list[str] = []
    for folder in folders:
        for row in json.loads((Path(folder) / "bench.json").read_text())["rows"]:
            if row["status"] == "failed":
                continue
            key = (row["detector"], row["ensemble"], row["backbone"].replace("tf_efficientnet_", ""))
            configs.setdefault(key, {})[row["category"]] = {**row, "_source": (Path(folder), row)}
            if row["category"] not in categories:
                categories.append(row["category"])
    header = ["detector", "fusion", "features", *(f"{c} img / px / PRO" for c in categories),
              "mean img AUROC", "mean px AUROC", "mean AU-PRO", "fit s / category", "predict ms / image"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, by_category in configs.items():
        rows = list(by_category.values())
        cells = [*key]
        for category in categories:
            row = by_category.get(category, {})
            cells.append(" / ".join(number(row.get(metric)) for metric in ACCURACY))
        cells += [number(mean(rows, metric)) for metric in ACCURACY]
        cells += [f"{mean(rows, 'fit_s'):.1f}", f"{mean(rows, 'predict_ms_per_image'):.0f}"]
        print("| " + " | ".join(cells) + " |")
    versus_members(configs, categories)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
