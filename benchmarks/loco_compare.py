#!/usr/bin/env python
"""Uninformed Students against GCAD on generated MVTec LOCO-layout data (the thesis' ch. 7 claim:
GCAD's global branch finds logical anomalies that the students' local patches cannot).

    python benchmarks/loco_compare.py [--data runs/loco-data] [--categories pushpins ...]
        [--image-size 128] [--st-epochs 5] [--gcad-epochs 20] [--teacher-steps 400]

Steps, each cached in ``--output`` (a rerun with the same settings reuses finished parts):

1. data: ``benchmarks/loco_data.py`` (256 px, 60 training, 20 validation, 20 good / structural /
   logical test images per category), read with ``--dataset mvtec-loco``;
2. one teacher file for both methods (``vad uninformed-students distill``, patch sizes 17, 33 and
   65) distilled on the training images of ``benchmarks/larger_data.py`` (textures and a gear):
   as in the thesis, the teacher never sees the evaluation data (thesis: ImageNet);
3. ``vad run`` of each method and category with that teacher, AU-sPRO up to FPR 0.05 (the
   thesis' Table 7.1 limit) per anomaly kind and their mean, and image AUROC per kind from the
   run's per-image scores (good test images against each kind's).

Both methods use their thesis architectures at a reduced input size and epoch count (CPU: the
thesis trains 100 and 500 epochs at 256 px on a GPU); the table states what ran.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = ("structural", "logical")


def vad_command() -> str:
    return str(Path(sys.executable).with_name("vad"))


def run_checked(command: list[str]) -> subprocess.CompletedProcess:
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    return finished


def build_data(args: argparse.Namespace) -> Path:
    data = Path(args.data)
    counts = ["--train", str(args.train), "--validation", "10"]
    run_checked([sys.executable, str(HERE / "loco_data.py"), str(data), *counts, *[a for c in args.categories for a in ("--category", c)]])
    generic = Path(args.teacher_images)
    run_checked([sys.executable, str(HERE / "larger_data.py"), str(generic)])
    return data


def distil_teachers(args: argparse.Namespace, output: Path) -> Path:
    """The shared teacher file, reused when it was made with the same settings."""
    patch_sizes = sorted(set(args.st_patch_sizes) | set(args.gcad_patch_sizes))
    settings = {"steps": args.teacher_steps, "patch_sizes": patch_sizes, "images": str(args.teacher_images), "image_size": args.image_size}
    teacher, facts = output / "teachers.safetensors", output / "teachers.json"
    if teacher.is_file() and facts.is_file() and json.loads(facts.read_text()) == settings:
        return teacher
    sizes = [a for p in settings["patch_sizes"] for a in ("--patch-size", str(p))]
    run_checked([
        vad_command(), "uninformed-students", "distill", "--images", str(args.teacher_images), "--output", str(teacher),
        *sizes, "--steps", str(args.teacher_steps), "--image-size", str(args.image_size),
    ])
    facts.write_text(json.dumps(settings))
    return teacher


def method_settings(method: str, args: argparse.Namespace, teacher: Path) -> list[str]:
    def listed(values: list[int]) -> str:
        return "[" + ", ".join(str(v) for v in values) + "]"

    settings: dict = {"image_size": args.image_size, "teacher_weights": str(teacher)}
    if method == "uninformed-students":
        settings.update(epochs=args.st_epochs, patch_sizes=listed(args.st_patch_sizes), students=args.st_students)
    else:  # GCAD scales its skip decay and R_glo start to the thesis' shares of a shorter schedule
        settings.update(epochs=args.gcad_epochs, patch_sizes=listed(args.gcad_patch_sizes), unet_width=args.gcad_unet_width)
    return [a for key, value in settings.items() for a in ("--set", f"{method}.{key}={value}")]


def image_auroc(scores: list[float], labels: list[int]) -> float:
    """AUROC with ties counted half (the Mann-Whitney statistic)."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def run_method(method: str, category: str, data: Path, args: argparse.Namespace, teacher: Path, out: Path) -> dict:
    if not (out / "metrics.json").is_file():
        finished = run_checked([
            vad_command(), "--json-log", "run", "--dataset", "mvtec-loco", "--root", str(data), "--category", category,
            "--detector", method, *method_settings(method, args, teacher), "--metric", "au_spro", "--set", "au_spro.fpr_limit=0.05",
            "--metric", "image_auroc", "--threshold", "manual", "--set", "manual.value=0", "--no-report", "--device", "cpu",
            "--output", str(out), "--overwrite",
        ])
        records = [json.loads(line) for line in finished.stderr.splitlines() if line.startswith("{")]
        loop = [r for r in records if r.get("event") == "done" and r.get("task") == f"{method} epochs"][-1]
        (out / "epochs.json").write_text(json.dumps({"epoch_s": loop["seconds"] / max(1, loop["items"])}))
    metrics = json.loads((out / "metrics.json").read_text())["categories"][category]
    rows = list(csv.DictReader((out / category / "scores.csv").open()))
    result = {"au_spro": metrics["au_spro"], **{f"au_spro_{k}": metrics.get(f"au_spro_{k}") for k in KINDS}}
    good = [float(r["score"]) for r in rows if r["label"] == "0"]
    for kind in KINDS:
        bad = [float(r["score"]) for r in rows if r["label"] == "1" and f"{kind}_anomalies" in r["path"].replace("\\", "/")]
        result[f"image_auroc_{kind}"] = image_auroc(good + bad, [0] * len(good) + [1] * len(bad))
    result.update(json.loads((out / "epochs.json").read_text()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/loco-data")
    parser.add_argument("--teacher-images", default="runs/larger-data", help="generic images for the teachers (built by larger_data.py when missing)")
    parser.add_argument("--categories", nargs="+", default=["pushpins", "splicing_connectors", "breakfast_box"])
    parser.add_argument("--methods", nargs="+", default=["uninformed-students", "gcad"])
    parser.add_argument("--train", type=int, default=60, help="training images per category")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--st-epochs", type=int, default=5)
    parser.add_argument("--st-patch-sizes", type=int, nargs="+", default=[17, 33, 65])
    parser.add_argument("--st-students", type=int, default=3)
    parser.add_argument("--gcad-epochs", type=int, default=20)
    parser.add_argument("--gcad-patch-sizes", type=int, nargs="+", default=[17, 33])
    parser.add_argument("--gcad-unet-width", type=int, default=6, help="log2 of the U-Nets' first width (thesis 6: 64 ... 1024 channels)")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--output", default="runs/loco-compare")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data = build_data(args)
    teacher = distil_teachers(args, output)
    lines = [
        f"Generated LOCO data ({data}, {args.train} training images per category), {args.image_size} px inputs; teachers: {args.teacher_steps} "
        f"distillation steps on {args.teacher_images}; S-T {args.st_epochs} epochs (patch sizes {args.st_patch_sizes}, {args.st_students} students each), "
        f"GCAD {args.gcad_epochs} epochs (patch sizes {args.gcad_patch_sizes}, U-Net width 2^{args.gcad_unet_width}).",
        "",
        "| category | method | AU-sPRO@0.05 structural | logical | mean | image AUROC structural | logical | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    means: dict[str, list[dict]] = {}
    for category in args.categories:
        for method in args.methods:
            result = run_method(method, category, data, args, teacher, output / f"{method}-{category}")
            means.setdefault(method, []).append(result)
            lines.append(
                f"| {category} | {method} | {result['au_spro_structural']:.3f} | {result['au_spro_logical']:.3f} | {result['au_spro']:.3f} | "
                f"{result['image_auroc_structural']:.3f} | {result['image_auroc_logical']:.3f} | {result['epoch_s']:.1f} |"
            )
            print(lines[-1], flush=True)
    for method, results in means.items():
        mean = {key: sum(r[key] for r in results) / len(results) for key in results[0]}
        lines.append(
            f"| **mean** | {method} | {mean['au_spro_structural']:.3f} | {mean['au_spro_logical']:.3f} | {mean['au_spro']:.3f} | "
            f"{mean['image_auroc_structural']:.3f} | {mean['image_auroc_logical']:.3f} | {mean['epoch_s']:.1f} |"
        )
    table = "\n".join(lines)
    (output / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
