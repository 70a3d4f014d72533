"""OpenVINO FP32, FP16 and INT8 against the torch model: accuracy and speed on the demo data.

    python benchmarks/openvino_int8.py                          # fits PatchCore (Lite0) on the demo first
    python benchmarks/openvino_int8.py --run runs/demo-x --repeats 5

For every category of the run, ``vad export --format openvino`` writes the model at fp32, fp16
and int8 (calibrated on the category's training images, the default); torch and each graph
score the test images one at a time. Columns: image AUROC, pixel AUROC (maps resized to the
masks as vad does), the largest score difference to torch relative to the largest torch score,
how many decisions at the model's image threshold differ from torch's, and milliseconds per
image (median of ``--repeats`` timed passes after a warm-up pass) with the ratio to OpenVINO fp32
measured in the same run. A second table splits each graph's time into the feature source (what
int8 quantises), the head and the rest (resize, upsampling, blur), from OpenVINO's counters.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")


def fit_demo(folder: Path) -> None:
    """PatchCore with its defaults on the demo's three categories."""
    subprocess.run([sys.executable, "-m", "vad.cli", "--quiet", "run", "--detector", "patchcore", "--dataset", "demo", "--output", str(folder), "--no-report"], check=True)


def timed(score, images, repeats: int) -> tuple[list, float]:
    """Scores and maps of ``images`` from ``score(image)``, and the median ms per image."""
    outputs = [score(image) for image in images]  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            score(image)
        times.append((time.perf_counter() - start) / len(images) * 1000.0)
    return outputs, statistics.median(times)


def part_rows(folder: Path, category: str, image, repeats: int) -> list[list[str]]:
    """Milliseconds per image in the feature source, the head and the rest of each OpenVINO
    graph, from the CPU plugin's per-operation counters (median of ``repeats`` runs)."""
    import openvino

    from vad.export import SOURCE_SCOPE, graph_input

    rows = []
    for precision in PRECISIONS:
        compiled = openvino.Core().compile_model(str(folder / f"model-{precision}.xml"), "CPU", {"PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        request.infer([graph_input(image)])  # warm-up
        parts: dict[str, list[float]] = {"feature source": [], "head": [], "rest": []}
        for _ in range(repeats):
            request.infer([graph_input(image)])
            totals = dict.fromkeys(parts, 0.0)
            for operation in request.profiling_info:
                name = operation.node_name
                part = "feature source" if name.startswith(f"/{SOURCE_SCOPE}/") else "head" if name.startswith("/head/") else "rest"
                totals[part] += operation.real_time.total_seconds() * 1000.0
            for part, value in totals.items():
                parts[part].append(value)
        rows.append([category, f"openvino {precision}", *(f"{statistics.median(values):.2f}" for values in parts.values())])
    return rows


def category_rows(run: Path, category: str, repeats: int) -> tuple[list[list[str]], list[list[str]]]:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from vad.build import create_dataset
    from vad.config import load_config
    from vad.contracts import Sample
    from vad.export import GraphSession
    from vad.model import AnomalyModel
    from vad.plugins import get_registry

    folder = run / category / "model"
    for precision in PRECISIONS:
        subprocess.run([sys.executable, "-m", "vad.cli", "--quiet", "export", "--model", str(folder), "--format", "openvino", "--precision", precision,
                        "--output", str(folder / f"model-{precision}.xml"), "--no-check"], check=True, capture_output=True)
    test = create_dataset(load_config(str(run / "config.yaml"), {}), get_registry()).load(category).test
    images = [sample.load_image() for sample in test]
    labels = np.array([sample.label for sample in test])
    masks = [mask if (mask := sample.load_mask()) is not None else np.zeros(image.shape[:2], bool) for sample, image in zip(test, images)]
    model = AnomalyModel.load(folder, "cpu")

    def torch_score(image):
        sample = Sample(path="image", label=0, category=category, split="test", image_loader=lambda: image)
        output = next(iter(model.predict([sample], description="torch")))
        return output.score, output.map

    def graph_score(session):
        def score(image):
            value, working = session(image)
            full = torch.nn.functional.interpolate(torch.from_numpy(working)[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
            return value, full
        return score

    runtimes = {"torch": torch_score, **{f"openvino {p}": graph_score(GraphSession(folder / f"model-{p}.xml")) for p in PRECISIONS}}
    results = {name: timed(score, images, repeats) for name, score in runtimes.items()}
    reference = np.array([score for score, _ in results["torch"][0]])
    base_ms = results["openvino fp32"][1]
    rows = []
    for name, (outputs, ms) in results.items():
        scores = np.array([score for score, _ in outputs])
        pixels = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for _, m in outputs])
        truth = np.concatenate([m.ravel() for m in masks])
        flipped = int(np.sum((scores >= model.image_threshold) != (reference >= model.image_threshold)))
        rows.append([category, name, f"{roc_auc_score(labels, scores):.3f}", f"{roc_auc_score(truth, pixels):.3f}",
                     f"{np.abs(scores - reference).max() / np.abs(reference).max():.1e}", f"{flipped} of {len(scores)}", f"{ms:.1f}", f"{ms / base_ms:.2f}"])
    return rows, part_rows(folder, category, images[0], repeats)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished vad run folder (default: fit PatchCore on the demo into runs/openvino-int8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from vad.progress import set_log_mode

    set_log_mode("quiet")
    run = args.run
    if run is None:
        run = Path("runs/openvino-int8")
        if not (run / "config.yaml").is_file():
            fit_demo(run)
    categories = sorted(p.parent.parent.name for p in run.glob("*/model/model.json"))
    header = ["category", "runtime", "image AUROC", "pixel AUROC", "max score diff / max score", "decisions unlike torch's", "ms / image", "vs openvino fp32"]
    tables = [category_rows(run, category, args.repeats) for category in categories]
    print_table(header, [row for rows, _ in tables for row in rows])
    print()
    print_table(["category", "runtime", "feature source ms", "head ms", "rest ms"], [row for _, parts in tables for row in parts])


if __name__ == "__main__":
    main()
