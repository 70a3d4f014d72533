#!/usr/bin/env python
"""How much of a run is the report? Fit, predict, report and total seconds of ``vad run`` with
PatchCore on the demo data, and the report's share of the run.

    python benchmarks/report.py                           # brick, median of 3 runs
    python benchmarks/report.py --category brick grass --runs 5 --output report-timing.md

Each run is ``vad run --dataset demo --detector DETECTOR --category CATEGORY --device DEVICE``
in a fresh process with its run folder in a temporary directory, so that every run pays the
imports the report needs, as a user's run does. Fit, predict and report seconds are the run's
own timings from ``metrics.json`` (``fit_s``, ``predict_s``, ``report_s``; the report's time
includes the metrics' curves it draws); total is the wall time of the whole process, start-up
and imports included: what a user waits for. The share is the report's seconds over the total,
per run. Every column is the median over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchcore import table


def timed_run(category: str, detector: str, device: str, folder: Path) -> dict[str, float]:
    """One ``vad run`` in a fresh process: its stage timings, test image count and wall time."""
    command = [sys.executable, "-m", "vad.cli", "--quiet", "run", "--dataset", "demo", "--detector", detector, "--category", category, "--device", device, "--output", str(folder)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    total = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-4000:]}")
    timings = json.loads((folder / "metrics.json").read_text())["timings"][category]
    with open(folder / category / "scores.csv") as handle:
        images = sum(1 for _ in handle) - 1
    return {"fit": timings["fit_s"], "predict": timings["predict_s"], "report": timings["report_s"], "total": total, "images": images}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", nargs="+", default=["brick"], help="Demo categories (default brick).")
    parser.add_argument("--detector", default="patchcore", help="Detector (default patchcore).")
    parser.add_argument("--device", default="cpu", help="Device (default cpu).")
    parser.add_argument("--runs", type=int, default=3, help="Runs per category (median reported).")
    parser.add_argument("--output", help="Also write the Markdown table here.")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="vad-report-bench-") as scratch:
        for category in args.category:
            runs = [timed_run(category, args.detector, args.device, Path(scratch) / f"{category}-{number}") for number in range(args.runs)]
            median = {key: statistics.median(run[key] for run in runs) for key in ("fit", "predict", "report", "total")}
            share = statistics.median(run["report"] / run["total"] for run in runs)
            rows.append([category, args.detector, int(runs[0]["images"]), *median.values(), f"{100 * share:.0f} %"])
    headers = ["category", "detector", "test images", "fit s", "predict s", "report s", "total s", "report share"]
    text = "\n".join(
        [
            f"`vad run` on the demo data, device {args.device}: median of {args.runs} runs, each in a fresh process "
            f"(total: the process's wall time; python {sys.version.split()[0]}).",
            "",
            table(headers, rows),
        ]
    )
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
