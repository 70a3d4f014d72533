"""VisA (Visual Anomaly), read through its official one-class split file.

Layout (as downloaded, plus the split file from the official repository)::

    <root>/split_csv/1cls.csv            object,split,label,image,mask
    <root>/<object>/Data/Images/Normal/0000.JPG
    <root>/<object>/Data/Images/Anomaly/000.JPG
    <root>/<object>/Data/Masks/Anomaly/000.png

``image`` and ``mask`` are relative to the root; ``label`` is ``normal`` or ``anomaly``.
VisA has no defect types in this split: anomalous images get ``defect_type = "anomaly"``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from vad.contracts import DataSplits, Sample
from vad.options import option

from vad_datasets.base import FileDataset, LayoutError, lacks, mask_loader

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip


class VisA(FileDataset):
    """VisA: 12 objects, the official ``split_csv/1cls.csv`` one-class split."""

    name = "visa"
    official_url = "https://github.com/amazon-science/spot-diff (images and split_csv/1cls.csv)"
    expected_layout = """
<root>/split_csv/1cls.csv                      (columns object,split,label,image,mask)
<root>/<object>/Data/Images/Normal/0000.JPG ...
<root>/<object>/Data/Images/Anomaly/000.JPG ...
<root>/<object>/Data/Masks/Anomaly/000.png ...
(a copy already converted to the MVTec layout loads with --dataset mvtec)
"""
    known_categories = VISA_CATEGORIES

    class Options(FileDataset.Options):
        split_file: str = option("split_csv/1cls.csv", "The split file, relative to the root (default: the official one-class split).")

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """``candle`` with ``split_csv/1cls.csv``: 5 training normals, 2 test normals, 2 anomalies with masks."""
        from vad_datasets import examples

        return str(examples.visa(folder))

    def rows(self) -> list[dict[str, str]]:
        """The split file's rows."""
        root = self.root_path()
        path = root / self.options.split_file
        if not path.is_file():
            raise self.layout_error(f"split file {path} is missing.")
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        needed = {"object", "split", "label", "image", "mask"}
        if not rows or not needed <= set(rows[0]):
            raise self.layout_error(f"{path} must have the columns {', '.join(sorted(needed))}.")
        return rows

    def categories(self) -> list[str]:
        """Objects named in the split file whose folder exists."""
        root = self.root_path()
        names = sorted({row["object"] for row in self.rows()})
        found = [name for name in names if (root / name).is_dir()]
        if not found:
            raise self.layout_error(f"none of the objects in the split file ({', '.join(names)}) has a folder under {root}.")
        return found

    def missing_image_error(self, path: Path, category_folder: Path) -> LayoutError:
        """An image the split file names is missing: a folder missing inside the category folder
        is named with what the category folder holds instead."""
        if path.parent.is_dir() or not path.is_relative_to(category_folder):
            return self.layout_error(f"{path} is named in the split file but missing.")
        missing = path.parent.relative_to(category_folder).as_posix()
        return self.layout_error(f"category folder {lacks(category_folder, missing)}; the split file names {path}.")

    def load(self, category: str) -> DataSplits:
        """Train rows -> train / validation; test rows -> test (masks for anomalies)."""
        self.check_category(category)
        root = self.root_path()
        rows = [row for row in self.rows() if row["object"] == category]
        train_paths: list[Path] = []
        test: list[Sample] = []
        for row in rows:
            path = root / row["image"]
            if not path.is_file():
                raise self.missing_image_error(path, root / category)
            if not self.readable(path):
                continue
            anomalous = row["label"].strip().lower() == "anomaly"
            if row["split"].strip() == "train":
                if not anomalous:
                    train_paths.append(path)
                continue
            if not anomalous:
                test.append(self.sample(path, label=0, category=category, split="test"))
                continue
            mask_path = root / row["mask"] if row["mask"].strip() else None
            if mask_path is None or not mask_path.is_file():
                raise self.layout_error(f"defect image {path} has no mask: expected {mask_path or 'a mask column entry'}.")
            test.append(self.sample(path, label=1, category=category, split="test", defect_type="anomaly", mask=mask_loader(mask_path, path)))
        self.require_train(train_paths, root / category / "Data" / "Images" / "Normal")
        train, validation = self.train_and_validation(sorted(train_paths), category)
        if not test:
            raise self.layout_error(f"the split file lists no test images for {category}.")
        return DataSplits(category=category, train=train, validation=validation, test=sorted(test, key=lambda s: (s.label, s.path)), has_masks=True)
