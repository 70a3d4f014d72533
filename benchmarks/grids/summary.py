#!/usr/bin/env python
"""One Markdown table from one or more ``vad bench`` folders: a row per configuration
(detector, fusion, features), image AUROC / pixel AUROC / AU-PRO per category, their means, and
the mean fit time per category and prediction time per image. Failed cells are left out.

Then, for every ensemble whose members also ran alone (in any of the folders), a second table
answers "does the ensemble beat its best member?" per category (and per anomaly kind where the
data set labels kinds, as MVTec LOCO does; AU-sPRO then gets a column), with paired bootstrap intervals
(:mod:`vad.comparison`; ``vad bench`` writes the same table as ``bench_members.md`` for one folder).

    vad bench --grid benchmarks/grids/members.yaml --output runs/bench-members
    python benchmarks/grids/summary.py runs/bench-members runs/bench-fusion ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from vad.comparison import against_members, markdown

ACCURACY = ("image_auroc", "pixel_auroc", "au_pro")
#: AU-sPRO on all anomalies and per kind (MVTec LOCO layouts), shown when the cells measured it.
SPRO = ("au_spro", "au_spro_structural", "au_spro_logical")


def number(value) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.3f}"


def mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
    return statistics.fmean(values) if values else None


def main(folders: list[str]) -> None:
    configs: dict[tuple[str, str, str], dict[str, dict]] = {}
    categories: list[str] = []
    every_row: list[dict] = []
    for folder in folders:
        for row in json.loads((Path(folder) / "bench.json").read_text())["rows"]:
            if row["status"] == "failed":
                continue
            key = (row["detector"], row["ensemble"], row["backbone"].replace("tf_efficientnet_", ""))
            configs.setdefault(key, {})[row["category"]] = row
            every_row.append({**row, "_folder": Path(folder) / "cells" / row["cell"]})
            if row["category"] not in categories:
                categories.append(row["category"])
    spro = any(isinstance(row.get("au_spro"), (int, float)) for row in every_row)
    header = ["detector", "fusion", "features", *(f"{c} img / px / PRO" for c in categories),
              "mean img AUROC", "mean px AUROC", "mean AU-PRO", *(["mean AU-sPRO all / structural / logical"] if spro else []),
              "fit s / category", "predict ms / image"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key, by_category in configs.items():
        rows = list(by_category.values())
        cells = [*key]
        for category in categories:
            row = by_category.get(category, {})
            cells.append(" / ".join(number(row.get(metric)) for metric in ACCURACY))
        cells += [number(mean(rows, metric)) for metric in ACCURACY]
        if spro:
            cells.append(" / ".join(number(mean(rows, metric)) for metric in SPRO))
        cells += [f"{mean(rows, 'fit_s'):.1f}", f"{mean(rows, 'predict_ms_per_image'):.0f}"]
        print("| " + " | ".join(cells) + " |")
    records = against_members(every_row, lambda row: row["_folder"])
    if records:
        print()
        print(markdown(records).replace("tf_efficientnet_", ""))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
