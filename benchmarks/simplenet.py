#!/usr/bin/env python
"""SimpleNet's old defaults vs its new defaults vs PaDiM (and PatchCore) on the demo data and on
the larger generated data set, on single (lite0) and fused (pca-global, concat of lite0+lite2)
features: image AUROC / pixel AUROC / AU-PRO per category and their means, and fit seconds.

    python benchmarks/simplenet.py [--output runs/bench-simplenet] [--data demo larger] [--features lite0 pca-global concat]

Every cell is one ``vad run ... --no-report --device cpu`` with default calibration in a fresh
process (its folder under ``--output``; a cell whose ``metrics.json`` exists is read, not run
again, so an interrupted benchmark continues): SimpleNet, a trained detector, holds 20 % of the
training images out for its thresholds; PaDiM and PatchCore train on every image and calibrate
by leave-one-out. AUROC and AU-PRO need no threshold.

Rows:

* ``simplenet (old defaults)``: the options before issue 23: absolute noise 0.015 in feature
  units, 20 epochs, the feature batches in the order given
  (``noise_scale=absolute batch_size=null epochs=20``);
* ``simplenet (defaults)``: ``vad run --detector simplenet`` as it is now;
* ``padim``, ``patchcore``: their defaults.

The larger data set is ``benchmarks/larger_data.py``'s ``build`` (five categories, 60 training
images of 224 px each), written to ``--larger-root`` (default: ``OUTPUT/larger-data``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FEATURES = {
    "lite0": [],
    "pca-global": ["--ensemble", "pca-global", "--backbone", "tf_efficientnet_lite0", "--backbone", "tf_efficientnet_lite2"],
    "concat": ["--ensemble", "concat", "--backbone", "tf_efficientnet_lite0", "--backbone", "tf_efficientnet_lite2"],
}
#: (row label, detector, extra arguments)
DETECTORS = [
    ("simplenet (old defaults)", "simplenet", ["--set", "simplenet.noise_scale=absolute", "--set", "simplenet.batch_size=null", "--set", "simplenet.epochs=20"]),
    ("simplenet (defaults)", "simplenet", []),
    ("padim", "padim", []),
    ("patchcore", "patchcore", []),
]
METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def vad_executable() -> str:
    local = Path(sys.executable).with_name("vad")
    return str(local) if local.exists() else "vad"


def run_cell(folder: Path, data_args: list[str], detector: str, extra: list[str], features: list[str]) -> dict:
    """``metrics.json`` of one configuration (run once; read back afterwards)."""
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        command = [vad_executable(), "run", "--detector", detector, *features, *data_args, *extra,
                   "--no-report", "--device", "cpu", "--output", str(folder)]
        print("$", " ".join(command), file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return json.loads(metrics.read_text())


def number(value) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.3f}"


def table(title: str, rows: list[tuple[str, str, dict]]) -> str:
    categories = list(rows[0][2]["categories"])
    header = ["detector", "features", *(f"{c} img / px / PRO" for c in categories), "mean img AUROC", "mean px AUROC", "mean AU-PRO", "fit s / category"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, features, result in rows:
        cells = [label, features]
        for category in categories:
            values = result["categories"][category]
            cells.append(" / ".join(number(values.get(m)) for m in METRICS))
        cells += [number(statistics.fmean(result["categories"][c][m] for c in categories)) for m in METRICS]
        cells.append(f"{statistics.fmean(result['timings'][c]['fit_s'] for c in categories):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/bench-simplenet", help="folder of the cells' run folders")
    parser.add_argument("--data", nargs="+", default=["demo", "larger"], choices=["demo", "larger"])
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    parser.add_argument("--detectors", nargs="+", default=[d[1] + ("-old" if "old" in d[0] else "") for d in DETECTORS],
                        help="simplenet-old, simplenet, padim, patchcore")
    parser.add_argument("--larger-root", help="where the larger data set is (built there if missing)")
    args = parser.parse_args()
    output = Path(args.output)
    tables = []
    for data in args.data:
        if data == "demo":
            data_args, title = [], "Demo data (3 categories, 24 training images of 128 px)"
        else:
            sys.path.insert(0, str(HERE))
            import larger_data

            root = Path(args.larger_root or output / "larger-data")
            summary = larger_data.build(root)
            first = next(iter(summary.values()))
            data_args = ["--dataset", "mvtec", "--root", str(root)]
            title = (f"Larger generated data ({len(summary)} categories, {first['train']} training images of 224 px, "
                     f"{first['test_good']} good + {first['test_defects']} defective test images each)")
        rows = []
        for features in args.features:
            for label, detector, extra in DETECTORS:
                key = detector + ("-old" if "old" in label else "")
                if key not in args.detectors:
                    continue
                folder = output / data / f"{key}--{features}"
                rows.append((label, features, run_cell(folder, data_args, detector, extra, FEATURES[features])))
        tables.append(table(title, rows))
        print(tables[-1] + "\n", flush=True)


if __name__ == "__main__":
    main()
