#!/usr/bin/env python
"""vad's teacher-student detectors side by side with anomalib 2.7's, same data, weights, size, epochs.

    python benchmarks/anomalib_compare.py --anomalib-python /work/anomalib-venv/bin/python \\
        [--categories brick gear gravel] [--epochs 10] [--image-size 224]

anomalib lives in its own virtual environment (never a dependency of vad): create it with the
CPU torch pinned, e.g. ``python -m venv A && A/bin/pip install -c constraints-cpu.txt
"anomalib==2.7.*" torch torchvision``; ``benchmarks/anomalib_runner.py`` is its side.

Data: ``benchmarks/larger_data.py`` (built into ``runs/larger-data`` when missing: 60 training
images of 224 px per category, 20 good and 30 defective test images). Both sides train on every
training image (vad with ``--threshold manual``: no calibration hold-out), with the method's
official batch size, and are scored on the test split by their own AUROC code.

Rows, and what each checks:

* ``stfpm`` on ``tf_efficientnet_lite0`` with its packaged ImageNet weights on both sides
  (anomalib gets them through a Hugging Face cache in the layout timm reads offline): the
  method with a pretrained teacher, levels at strides 4, 8, 16 (lite0 ``blocks.1/2/4``).
* ``stfpm`` and ``reverse-distillation`` on ``resnet18`` with one randomly initialised state dict
  (seed 0, saved once) on both sides: anomalib's Reverse Distillation decoder exists for ResNets
  only, and no ResNet ImageNet weights can be downloaded here. These rows check the
  implementations against each other, not the papers' accuracy.

Epoch time: the mean over the training epochs only (vad: its training loop's JSON-log record;
anomalib: a callback around Lightning's training epochs, validation passes excluded), same
machine, same thread count, one job at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROWS = (
    ("stfpm", "tf_efficientnet_lite0", "ImageNet (packaged) on both"),
    ("stfpm", "resnet18", "random ResNet-18, same weights: implementation check"),
    ("reverse-distillation", "resnet18", "random ResNet-18, same weights: implementation check"),
)
#: vad's settings per method: its defaults (the official code's), and where anomalib departs from
#: the official code, anomalib's choice, so that the implementations can be compared as well.
VARIANTS = {
    "stfpm": (
        ("official", "defaults (official)", []),
        ("anomalib", "anomalib's loss sum and weight decay 1e-3", ["--set", "stfpm.loss_reduction=anomalib", "--set", "stfpm.weight_decay=0.001"]),
    ),
    "reverse-distillation": (
        ("official", "defaults (official)", []),
        ("anomalib", "anomalib's Adam betas (0.5, 0.99)", ["--set", "reverse-distillation.betas=[0.5, 0.99]"]),
    ),
}
LITE0_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
BATCH = {"stfpm": 32, "reverse-distillation": 16}


def _hub_cache(root: Path, repo: str, state: dict) -> None:
    """``state`` as ``timm/<repo>`` in a Hugging Face cache under ``root`` (what timm reads offline)."""
    from safetensors.torch import save_file

    base = root / "hub" / f"models--timm--{repo}"
    commit = "0" * 40
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")


def prepare_weights(folder: Path) -> dict[str, Path]:
    """The shared weights: ``{backbone: file vad loads}``; anomalib's copies go to ``folder/hf``."""
    import torch
    from vad_timm.compat import import_timm
    from vad_timm.weights import packaged_state_dict
    from safetensors.torch import save_file

    timm = import_timm()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    random_resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    resnet_file = folder / "resnet18-random.safetensors"
    save_file({k: v.contiguous() for k, v in random_resnet.items()}, resnet_file)
    _hub_cache(folder / "hf", "resnet18.a1_in1k", random_resnet)
    lite0 = packaged_state_dict("tf_efficientnet_lite0")
    lite0_file = folder / "lite0-imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.items()}, lite0_file)
    _hub_cache(folder / "hf", "tf_efficientnet_lite0.in1k", lite0)
    return {"resnet18": resnet_file, "tf_efficientnet_lite0": lite0_file}


def run_vad(method: str, backbone: str, weights: Path, data: Path, category: str, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    key = "backbone" if method == "stfpm" else "encoder"
    spec = backbone if backbone.startswith("tf_efficientnet") else f"timm:{backbone}"
    command = [
        str(Path(sys.executable).with_name("vad")), "--json-log", "run", "--dataset", "mvtec", "--root", str(data), "--category", category,
        "--detector", method, "--set", f"{method}.{key}={spec}", "--set", f"{method}.weights={weights}",
        "--set", f"{method}.epochs={args.epochs}", "--set", f"{method}.image_size={args.image_size}",
        "--threshold", "manual", "--set", "manual.value=0", "--metric", "image_auroc", "--metric", "pixel_auroc",
        "--no-report", "--device", "cpu", "--output", str(out), "--overwrite", *extra,
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"vad failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    records = [json.loads(line) for line in finished.stderr.splitlines() if line.startswith("{")]
    epochs = [r for r in records if r.get("event") == "done" and r.get("task") == f"{method} epochs"]  # the training loop
    metrics = json.loads((out / "metrics.json").read_text())["categories"][category]
    loop = epochs[-1]
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"], "epoch_s": loop["seconds"] / max(1, loop["items"])}


def run_anomalib(method: str, backbone: str, data: Path, category: str, args: argparse.Namespace, cache: Path, out: Path) -> dict:
    """anomalib's result for one cell; reused from ``out/result.json`` when it was run with the same settings."""
    settings = {"epochs": args.epochs, "image_size": args.image_size}
    saved = out / "result.json"
    if saved.is_file():
        result = json.loads(saved.read_text())
        if result.get("settings") == settings:
            return result
    layers = LITE0_LAYERS if backbone.startswith("tf_efficientnet") else ["layer1", "layer2", "layer3"]
    command = [
        args.anomalib_python, str(HERE / "anomalib_runner.py"), "--model", method, "--root", str(data), "--category", category,
        "--backbone", backbone, "--layers", *layers, "--image-size", str(args.image_size), "--epochs", str(args.epochs),
        "--batch-size", str(BATCH[method]),
    ]
    environment = {**os.environ, "HF_HOME": str(cache), "HF_HUB_OFFLINE": "1", "ANOMALIB_RESULTS": str(out)}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        raise SystemExit(f"anomalib failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    result = {**json.loads(lines[-1]), "settings": settings}
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anomalib-python", required=True, help="python of the virtual environment that has anomalib 2.7")
    parser.add_argument("--data", default="runs/larger-data")
    parser.add_argument("--categories", nargs="+", default=["brick", "gear", "gravel"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--methods", nargs="+", default=["stfpm", "reverse-distillation"])
    parser.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "resnet18"])
    parser.add_argument("--variants", nargs="+", default=["official", "anomalib"], help="vad settings to run: official, anomalib (anomalib's departures)")
    parser.add_argument("--output", default="runs/anomalib-compare")
    args = parser.parse_args()

    data, output = Path(args.data), Path(args.output)
    if not (data / "larger_data.json").is_file():
        from larger_data import build

        build(data)
    weights = prepare_weights(output)
    lines = [
        f"{args.epochs} epochs, {args.image_size} px, official batch sizes (STFPM 32, RD 16), every training image, CPU",
        "",
        "| method | backbone (weights) | vad settings | category | vad img / px AUROC | anomalib img / px AUROC | vad s / epoch | anomalib s / epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, backbone, what in ROWS:
        if method not in args.methods or backbone not in args.backbones:
            continue
        for category in args.categories:
            cell = output / f"{method}-{backbone}-{category}"
            theirs = run_anomalib(method, backbone, data, category, args, output / "hf", cell / "anomalib")
            for key, settings, extra in VARIANTS[method]:
                if key not in args.variants:
                    continue
                ours = run_vad(method, backbone, weights[backbone], data, category, args, cell / f"vad-{key}", extra)
                lines.append(
                    f"| {method} | {backbone} ({what}) | {settings} | {category} | {ours['image_auroc']:.3f} / {ours['pixel_auroc']:.3f} | "
                    f"{theirs['image_auroc']:.3f} / {theirs['pixel_auroc']:.3f} | {ours['epoch_s']:.2f} | {theirs['epoch_s']:.2f} |"
                )
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    (output / "table.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
