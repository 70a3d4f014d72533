"""Tiny example trees in each official layout, used by ``tiny_layout`` and the tests.

Each builder writes a few small images (24x32 by default: non-square, to catch transposed
sizes), masks where the layout has them, and returns the root to pass to the data set. Nothing
is downloaded and no real data is used. ``Dataset.tiny_layout`` of every data set here calls one
of them (the conformance kit checks the data set on it); the plugin's tests build variants of
them through the ``trees`` fixture.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (24, 32)  # H, W: non-square to catch transposed sizes


def write_image(path: Path, array: np.ndarray | None = None, size=SIZE, value: int = 100) -> Path:
    """Write an 8-bit image (RGB by default) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.full((*size, 3), value, np.uint8)
    Image.fromarray(array).save(path)
    return path


def write_mask(path: Path, box=(2, 3, 8, 10), size=SIZE, value: int = 255) -> Path:
    """A single-channel mask with ``value`` in the box ``(top, left, bottom, right)``."""
    mask = np.zeros(size, np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = value
    return write_image(path, mask, size)


def mvtec(root: Path, category="bottle", train=10, good=2, defects=None, ext=".png", normal="good", suffix="_mask", masks=True):
    """MVTec AD layout (also MPDD's; BTAD's with ``normal="ok"``, ``suffix=""``)."""
    defects = {"broken": 2, "crack": 1} if defects is None else defects
    folder = root / category
    for i in range(train):
        write_image(folder / "train" / normal / f"{i:03d}{ext}", value=90 + i)
    for i in range(good):
        write_image(folder / "test" / normal / f"{i:03d}{ext}")
    for defect, count in defects.items():
        for i in range(count):
            write_image(folder / "test" / defect / f"{i:03d}{ext}", value=200)
            if masks:
                write_mask(folder / "ground_truth" / defect / f"{i:03d}{suffix}.png", box=(1, 1, 5 + i, 6))
    return root


def multi_view(root: Path, product="flange", views=None, train=5):
    """Multi-view layout: ``<root>/<product>/<view>/``, each view in the MVTec AD layout.

    ``views`` maps each view to whether it has masks; default ``front`` with masks and ``side``
    without (a view may have no ``ground_truth`` folder).
    """
    views = {"front": True, "side": False} if views is None else views
    for view, masks in views.items():
        mvtec(root / product, view, train=train, masks=masks)
    return root


def loco(root: Path, category="pushpins"):
    """MVTec LOCO layout with multi-file masks and defects_config.json.

    Test images: good/000; structural_anomalies/000 (one annotation, value 10, 6x5=30 px);
    logical_anomalies/000 (two annotations: value 20, 10x10=100 px, absolute threshold 40; value
    30, 4x4=16 px, absolute threshold 40 -> capped at 16); logical_anomalies/001 (one annotation,
    value 40, 7x10=70 px, relative 0.55 -> int(38.5)=38).
    """
    folder = root / category
    for i in range(6):
        write_image(folder / "train" / "good" / f"{i:03d}.png", value=80 + i)
    for i in range(2):
        write_image(folder / "validation" / "good" / f"{i:03d}.png")
    write_image(folder / "test" / "good" / "000.png")
    write_image(folder / "test" / "structural_anomalies" / "000.png")
    write_image(folder / "test" / "logical_anomalies" / "000.png")
    write_image(folder / "test" / "logical_anomalies" / "001.png")
    gt = folder / "ground_truth"
    write_mask(gt / "structural_anomalies" / "000" / "000.png", box=(0, 0, 6, 5), value=10)
    write_mask(gt / "logical_anomalies" / "000" / "000.png", box=(10, 10, 20, 20), value=20)
    write_mask(gt / "logical_anomalies" / "000" / "001.png", box=(0, 0, 4, 4), value=30)
    write_mask(gt / "logical_anomalies" / "001" / "000.png", box=(0, 0, 7, 10), value=40)
    config = [
        {"defect_name": "broken_pushpin", "pixel_value": 10, "saturation_threshold": 1.0, "relative_saturation": True},
        {"defect_name": "additional_pushpin", "pixel_value": 20, "saturation_threshold": 40, "relative_saturation": False},
        {"defect_name": "missing_pushpin", "pixel_value": 30, "saturation_threshold": 40, "relative_saturation": False},
        {"defect_name": "wrong_color", "pixel_value": 40, "saturation_threshold": 0.55, "relative_saturation": True},
    ]
    (folder / "defects_config.json").write_text(json.dumps(config))
    return root


def visa(root: Path, category="candle"):
    """VisA layout with split_csv/1cls.csv: 5 train normals, 2 test normals, 2 test anomalies."""
    rows = []
    base = root / category / "Data"
    for i in range(7):
        write_image(base / "Images" / "Normal" / f"{i:04d}.JPG")
        rows.append([category, "train" if i < 5 else "test", "normal", f"{category}/Data/Images/Normal/{i:04d}.JPG", ""])
    for i in range(2):
        write_image(base / "Images" / "Anomaly" / f"{i:03d}.JPG", value=220)
        write_mask(base / "Masks" / "Anomaly" / f"{i:03d}.png", value=1 + i)  # VisA masks hold small label values
        rows.append([category, "test", "anomaly", f"{category}/Data/Images/Anomaly/{i:03d}.JPG", f"{category}/Data/Masks/Anomaly/{i:03d}.png"])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def mvtec3d(root: Path, category="bagel"):
    """MVTec 3D-AD layout (rgb + gt; an xyz tiff placeholder is ignored)."""
    folder = root / category
    for i in range(5):
        write_image(folder / "train" / "good" / "rgb" / f"{i:03d}.png")
    for i in range(2):
        write_image(folder / "validation" / "good" / "rgb" / f"{i:03d}.png")
    write_image(folder / "test" / "good" / "rgb" / "000.png")
    write_mask(folder / "test" / "good" / "gt" / "000.png", box=(0, 0, 0, 0))
    for i in range(3):
        write_image(folder / "test" / "crack" / "rgb" / f"{i:03d}.png")
        write_mask(folder / "test" / "crack" / "gt" / f"{i:03d}.png")
        (folder / "test" / "crack" / "xyz").mkdir(parents=True, exist_ok=True)
        (folder / "test" / "crack" / "xyz" / f"{i:03d}.tiff").write_bytes(b"not read")
    return root


def folder(root: Path, normal="good", defects=None, masks="masks", count=10):
    """Your own folders: ``count`` normal images in ``<root>/<normal>``, ``<root>/<defect>/`` per
    defect type and, unless ``masks`` is None, ``<root>/<masks>/<stem>_mask.png`` for each
    defective image (the folder data set's default ``mask_pattern``)."""
    defects = {"dent": 2} if defects is None else defects
    for i in range(count):
        write_image(root / normal / f"{i:03d}.png", value=90 + i)
    for defect, number in defects.items():
        for i in range(number):
            write_image(root / defect / f"{defect}{i}.png", value=250)
            if masks is not None:
                write_mask(root / masks / f"{defect}{i}_mask.png")
    return root


__all__ = ["SIZE", "folder", "loco", "multi_view", "mvtec", "mvtec3d", "visa", "write_image", "write_mask"]
