"""Threshold rules side by side: the false alarms they promise and the ones they give.

    python benchmarks/thresholds.py                          # demo data, PatchCore
    python benchmarks/thresholds.py --root DIR --dataset mvtec --detector padim
    python benchmarks/larger_data.py /tmp/larger && python benchmarks/thresholds.py --root /tmp/larger --dataset mvtec

For every category a model is fitted once with vad's default calibration (leave-one-out where
the detector offers it: every training image trains the detector and is scored as left out),
then each rule is fitted on the same calibration scores. The table gives per rule: the
false-alarm rate the calibration expects (with its 95 % interval, :mod:`vad.calibration`), the
rate observed on the category's good test images, and the share of defective test images it
catches (recall). Means over categories in the last rows.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

RULES = [
    ("conformal", {"alpha": 0.05}),
    ("conformal", {"alpha": 0.1}),
    ("k-sigma", {"k": 3.0}),
    ("max", {}),
    ("quantile", {"q": 0.99}),
]


def category_rows(config, registry, category: str) -> list[dict]:
    """One row per rule for one category."""
    from vad.build import build_model, create_dataset
    from vad.calibration import false_alarm_estimate

    splits = create_dataset(config, registry).load(category)
    model = build_model(config, registry)
    model.fit(splits.train, splits.validation)
    method = model.calibration["method"]
    calibration = model.normal_calibration_scores
    outputs = list(model.predict(splits.test, description=f"test {category}"))
    scores = np.array([o.score for o in outputs])
    labels = np.array([o.sample.label for o in outputs])
    rows = []
    for name, options in RULES:
        rule = registry.load_class("thresholds", name)(**options)
        threshold = rule.fit(calibration, np.zeros(len(calibration), int))
        estimate = false_alarm_estimate(list(calibration), threshold)
        rows.append({
            "category": category,
            "rule": name + "".join(f" {k}={v:g}" for k, v in options.items()),
            "calibration": f"{method} ({len(calibration)})",
            "expected": estimate["expected"],
            "low": estimate["low"],
            "high": estimate["high"],
            "observed": float(np.mean(scores[labels == 0] >= threshold)),
            "recall": float(np.mean(scores[labels == 1] >= threshold)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--root", default=None)
    parser.add_argument("--detector", default="patchcore")
    parser.add_argument("--category", nargs="*", default=None)
    args = parser.parse_args()

    from vad.build import create_dataset
    from vad.config import RunConfig
    from vad.plugins import get_registry
    from vad.progress import set_log_mode

    set_log_mode("quiet")
    registry = get_registry()
    config = RunConfig(dataset=args.dataset, root=args.root, detectors=[args.detector], device="cpu", report=False)
    categories = args.category or create_dataset(config, registry).categories()
    rows = [row for category in categories for row in category_rows(config, registry, category)]
    print(f"{args.detector} on {args.dataset}{' ' + args.root if args.root else ''}; calibration scores per category in brackets\n")
    print("| category | rule | calibration | expected false alarms (95 % interval) | observed on good test images | recall on defective |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['category']} | {row['rule']} | {row['calibration']} | {row['expected']:.3f} ({row['low']:.3f}-{row['high']:.3f}) | {row['observed']:.3f} | {row['recall']:.3f} |")
    for rule in dict.fromkeys(row["rule"] for row in rows):
        chosen = [row for row in rows if row["rule"] == rule]
        mean = {key: statistics.fmean(row[key] for row in chosen) for key in ("expected", "observed", "recall")}
        print(f"| **mean** | {rule} | | {mean['expected']:.3f} | {mean['observed']:.3f} | {mean['recall']:.3f} |")


if __name__ == "__main__":
    main()
