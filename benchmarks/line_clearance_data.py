#!/usr/bin/env python
"""A generated line-clearance data set (seed 001) in the ``multi-view`` layout, and the study of
regions of interest and registration on it.

    python benchmarks/line_clearance_data.py build OUT_DIR [--size 128] [--train 20] [--good 20] [--anomalous 20]
    python benchmarks/line_clearance_data.py study OUT_DIR [--detector patchcore] [--runs runs/line-clearance]

One machine photographed by three fixed cameras (views ``A``, ``B``, ``C``; categories
``machine/A`` ...). Each view shows its own static scene: a smooth random texture of machine
parts with a few hard-edged plates and bolts (what ORB and phase correlation lock on to). Every
shot adds sensor noise and a small lighting change; on top of that:

* **the camera shifts**: training shots jitter by at most ``--train-shift`` px (a careful
  set-up), test shots by up to ``--test-shift`` px in x and y (an operator nudged the camera);
* **a moving irrelevant region** in view ``B``: a strip on the left of the view where a cable (a
  dark bar with a highlight) hangs at a random height in every shot, and where the machine's
  arm (a bright orange link) reaches in during half of the test shots, never during training
  (the line was stopped); the study's ROI leaves that strip out (``roi_polygons``);
* **anomalous shots**: a foreign object (a tool, a glove, a screw: a coloured shape with an
  outline) lies somewhere in the inspected part of one view chosen at random; the other views of
  that shot are good. Masks mark the object.

Images of one shot share their file name across views (``shot_017.png``), which is how vad
matches the views of a shot. ``study`` runs the detector four ways (nothing, ROI, registration,
both) and prints, per configuration, the false-alarm rate and accuracy per view and per shot
(a shot is flagged when any view is), with the all-good baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

VIEWS = ("A", "B", "C")
CABLE_STRIP = 0.22  # the share of view B's width, on the left, where the cable moves


def roi_polygons(size: int) -> dict[str, object]:
    """The study's regions of interest: view B without its cable strip (plus a margin for the
    feature grid and blur), the other views whole."""
    left = int(size * (CABLE_STRIP + 0.06))
    return {"machine/A": None, "machine/B": [[[left, 0], [size, 0], [size, size], [left, size]]], "machine/C": None}


def static_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A view's fixed scene (float RGB in [0, 1], larger than the image so shifts never run out)."""
    big = size + 32
    noise = rng.random((big, big, 3))
    scene = np.stack([ndimage.gaussian_filter(noise[..., c], big / 40) for c in range(3)], axis=2)
    scene = 0.25 + 0.5 * (scene - scene.min()) / (scene.max() - scene.min())
    for _ in range(6):  # plates with hard edges
        top, left = rng.integers(0, big - big // 4, size=2)
        height, width = rng.integers(big // 10, big // 4, size=2)
        scene[top : top + height, left : left + width] = rng.uniform(0.15, 0.9, 3)
    yy, xx = np.mgrid[0:big, 0:big]
    for _ in range(10):  # bolts
        cy, cx = rng.integers(4, big - 4, size=2)
        radius = rng.uniform(1.5, big / 40)
        scene[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = rng.uniform(0.05, 0.95)
    return scene


def shot(scene: np.ndarray, size: int, shift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The camera's view of ``scene`` moved by ``shift`` (x, y) px, with lighting and noise."""
    offset = 16 + shift[::-1]  # (y, x)
    view = np.stack([ndimage.shift(scene[..., c], -offset, order=1, mode="nearest")[:size, :size] for c in range(3)], axis=2)
    view = view * rng.uniform(0.97, 1.03) + rng.normal(0, 0.012, view.shape)
    return view


def add_cable(image: np.ndarray, rng: np.random.Generator) -> None:
    """A dark cable with a highlight hanging across view B's left strip at a random height."""
    size = image.shape[0]
    strip = int(size * CABLE_STRIP)
    top = int(rng.integers(0, size - size // 3))
    length = int(rng.integers(size // 6, size // 3))
    left = int(rng.integers(2, max(3, strip - size // 12)))
    width = max(3, size // 20)
    image[top : top + length, left : left + width] = (0.08, 0.08, 0.1)
    image[top : top + length, left + 1 : left + 2] = (0.5, 0.5, 0.55)


def add_arm(image: np.ndarray, rng: np.random.Generator) -> None:
    """The machine's arm reaching into view B's left strip: a bright orange link with a grey
    joint, at a random height; it comes only while the line runs, so no training shot has it."""
    size = image.shape[0]
    strip = int(size * CABLE_STRIP)
    top = int(rng.integers(0, size - size // 4))
    height = int(rng.integers(size // 10, size // 5))
    image[top : top + height, : strip - 2] = (0.95, 0.55, 0.1)
    joint = max(3, size // 16)
    image[top + height // 2 - joint // 2 : top + height // 2 + joint // 2 + 1, strip - 2 - 2 * joint : strip - 2] = (0.6, 0.6, 0.62)


def add_foreign_object(image: np.ndarray, rng: np.random.Generator, lowest_x: int) -> np.ndarray:
    """A coloured object with a dark outline at a random place right of ``lowest_x``; its mask."""
    size = image.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    radius = rng.uniform(size / 24, size / 12)
    cy = rng.uniform(radius + 2, size - radius - 2)
    cx = rng.uniform(max(lowest_x, 0) + radius + 2, size - radius - 2)
    stretch = rng.uniform(0.5, 2.0)
    inside = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * stretch)) ** 2 <= 1
    outline = ((yy - cy) / (radius + 1.5)) ** 2 + ((xx - cx) / (radius * stretch + 1.5)) ** 2 <= 1
    image[outline] = (0.05, 0.05, 0.05)
    image[inside] = rng.choice([(0.9, 0.2, 0.1), (0.1, 0.6, 0.9), (0.95, 0.85, 0.1), (0.2, 0.8, 0.3)])
    return outline


def save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)


def build(root: Path, size: int = 128, train: int = 20, good: int = 20, anomalous: int = 20,
          train_shift: float = 0.5, test_shift: float = 4.0, seed: int = 0) -> Path:
    """Write the data set under ``root / "machine"``; returns ``root``."""
    rng = np.random.default_rng(seed)
    scenes = {view: static_scene(rng, size) for view in VIEWS}
    lowest_x = {view: int(size * (CABLE_STRIP + 0.1)) if view == "B" else 0 for view in VIEWS}
    plan = [("train", "good", index, None) for index in range(train)]
    plan += [("test", "good", index, None) for index in range(good)]
    plan += [("test", "foreign_object", index, VIEWS[int(rng.integers(0, len(VIEWS)))]) for index in range(anomalous)]
    for number, (split, kind, _, anomalous_view) in enumerate(plan):
        limit = train_shift if split == "train" else test_shift
        name = f"shot_{number:03d}"
        for view in VIEWS:
            shift = rng.uniform(-limit, limit, 2)
            image = shot(scenes[view], size, shift, rng)
            if view == "B":
                add_cable(image, rng)
                if split == "test" and rng.random() < 0.5:
                    add_arm(image, rng)
            folder = root / "machine" / view
            if view == anomalous_view:
                mask = add_foreign_object(image, rng, lowest_x[view])
                save(folder / "test" / kind / f"{name}.png", image)
                save(folder / "ground_truth" / kind / f"{name}_mask.png", mask.astype(float))
            else:
                save(folder / split / "good" / f"{name}.png", image)
    return root


def study(root: Path, detector: str, runs: Path, python: str = sys.executable) -> None:
    """Four runs (nothing, ROI, registration, both) and the false-alarm tables per view and shot."""
    import yaml

    size = Image.open(next((root / "machine" / "A" / "train" / "good").glob("*.png"))).size[0]
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, extra in (
        ("plain", {}),
        ("roi", {"roi": roi_polygons(size)}),
        ("registration", {"registration": "translation"}),
        ("roi + registration", {"roi": roi_polygons(size), "registration": "translation"}),
    ):
        folder = runs / name.replace(" + ", "-")
        config = {"dataset": "multi-view", "root": str(root), "detectors": [detector], "report": False, **extra}
        config_file = runs / f"{folder.name}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        if not (folder / "metrics.json").is_file():
            subprocess.run([python, "-m", "vad.cli", "--quiet", "run", "--config", str(config_file), "--output", str(folder), "--overwrite"], check=True)
        metrics = json.loads((folder / "metrics.json").read_text())
        for category, decisions in metrics["decisions"].items():
            rows.append((name, category, decisions, metrics["categories"][category].get("image_auroc")))
        for machine, decisions in metrics.get("shot_decisions", {}).items():
            rows.append((name, f"{machine}: shots", decisions, None))
    print("| configuration | view / shots | image AUROC | false alarms (chosen rule) | recall | accuracy | all-good accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, where, decisions, auroc in rows:
        chosen = next(values for rule, values in decisions.items() if rule.startswith("chosen"))
        baseline = decisions["all good (baseline)"]
        alarms = f"{chosen['fp']} / {chosen['fp'] + chosen['tn']} ({chosen['false_alarm_rate']:.0%})"
        auroc_text = "–" if auroc is None else f"{auroc:.3f}"
        print(f"| {name} | {where} | {auroc_text} | {alarms} | {chosen['recall']:.2f} | {chosen['accuracy']:.2f} | {baseline['accuracy']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("build")
    making.add_argument("root", type=Path)
    making.add_argument("--size", type=int, default=128)
    making.add_argument("--train", type=int, default=20)
    making.add_argument("--good", type=int, default=20)
    making.add_argument("--anomalous", type=int, default=20)
    making.add_argument("--train-shift", type=float, default=0.5)
    making.add_argument("--test-shift", type=float, default=4.0)
    making.add_argument("--seed", type=int, default=0)
    studying = commands.add_parser("study")
    studying.add_argument("root", type=Path)
    studying.add_argument("--detector", default="patchcore")
    studying.add_argument("--runs", type=Path, default=Path("runs/line-clearance"))
    args = parser.parse_args()
    if args.command == "build":
        build(args.root, args.size, args.train, args.good, args.anomalous, args.train_shift, args.test_shift, args.seed)
        print(f"multi-view data set in {args.root}: vad run --dataset multi-view --root {args.root}")
    else:
        study(args.root, args.detector, args.runs)


if __name__ == "__main__":
    main()
