"""MVTec LOCO AD: structural and logical anomalies, one mask file per annotated defect.

Layout (``<root>/<category>/``)::

    train/good/000.png
    validation/good/000.png
    test/{good,logical_anomalies,structural_anomalies}/000.png
    ground_truth/{logical_anomalies,structural_anomalies}/000/000.png, 001.png, ...
    defects_config.json

Each ground-truth PNG is one region (as the official evaluation's ``GroundTruthMap`` reads
it, not split into connected components); its single positive pixel value names the defect
in ``defects_config.json``, which gives the region's saturation threshold for sPRO.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from vad.contracts import DataSplits, Region, Sample

from vad_datasets.base import FileDataset, LayoutError, list_images, load_union_mask, mask_loader, subfolders

LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
ANOMALY_FOLDERS = {"structural_anomalies": "structural", "logical_anomalies": "logical"}


def read_defects_config(path: Path) -> dict[int, dict[str, Any]]:
    """``{pixel_value: {"defect_name", "saturation_threshold", "relative_saturation"}}``."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LayoutError(f"cannot read {path}: {error}") from error
    if not isinstance(entries, list):
        raise LayoutError(f"{path} must hold a JSON list of defect entries")
    table: dict[int, dict[str, Any]] = {}
    for entry in entries:
        try:
            value = int(entry["pixel_value"])
            table[value] = {
                "defect_name": str(entry["defect_name"]),
                "saturation_threshold": float(entry["saturation_threshold"]),
                "relative_saturation": bool(entry["relative_saturation"]),
            }
        except (KeyError, TypeError, ValueError) as error:
            raise LayoutError(
                f"{path}: every entry needs defect_name, pixel_value, saturation_threshold and "
                f"relative_saturation; bad entry {entry!r} ({error})"
            ) from error
    return table


def saturation_area(region_area: int, threshold: float, relative: bool) -> float:
    """Pixels of overlap at which a region counts as fully detected (official LOCO rule).

    Relative thresholds are a share of the region: ``int(threshold * area)``; absolute ones are
    pixel counts at original resolution, capped by the region's area.
    """
    if relative:
        return float(int(threshold * region_area))
    return float(min(threshold, region_area))


class MVTecLOCO(FileDataset):
    """MVTec LOCO AD: ``anomaly_kind`` structural / logical, one Region per annotation file."""

    name = "mvtec-loco"
    official_url = "https://www.mvtec.com/company/research/datasets/mvtec-loco"
    expected_layout = """
<root>/<category>/train/good/000.png ...
<root>/<category>/validation/good/000.png ...
<root>/<category>/test/{good,logical_anomalies,structural_anomalies}/000.png ...
<root>/<category>/ground_truth/{logical_anomalies,structural_anomalies}/000/000.png ...  (one PNG per defect)
<root>/<category>/defects_config.json
"""
    known_categories = LOCO_CATEGORIES

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """``pushpins``: training, validation, good, structural and logical test images, one mask
        file per annotation and ``defects_config.json``."""
        from vad_datasets import examples

        return str(examples.loco(folder))

    def category_marker(self) -> str:
        """``train/good``: what makes a folder one category."""
        return "train/good"

    def regions_of(self, image: Path, mask_dir: Path, config: dict[int, dict[str, Any]], config_path: Path) -> tuple[list[Path], tuple[Region, ...]]:
        """Annotation files of one test image and their regions with saturation areas."""
        import numpy as np
        from PIL import Image

        files = list_images(mask_dir, (".png",))
        if not files:
            raise self.layout_error(f"defect image {image} has no mask: expected one or more PNGs in {mask_dir}/.")
        regions = []
        kept = []
        for file in files:
            if not self.readable(file):
                continue
            with Image.open(file) as handle:
                values = np.asarray(handle)
            if values.ndim == 3:  # an RGB-saved annotation: the value is the same in every channel
                values = values.max(axis=2)
            positive = np.unique(values[values > 0])
            if positive.size == 0:  # an empty annotation is no region (it cannot be detected)
                continue
            if positive.size > 1:
                raise LayoutError(f"annotation {file} holds several defect values {positive.tolist()}; LOCO masks hold exactly one")
            value = int(positive[0])
            if value not in config:
                raise LayoutError(f"annotation {file} has pixel value {value}, which {config_path} does not define")
            entry = config[value]
            area = int((values > 0).sum())
            regions.append(
                Region(
                    mask_loader=mask_loader(file, image),
                    saturation_area=saturation_area(area, entry["saturation_threshold"], entry["relative_saturation"]),
                    defect_name=entry["defect_name"],
                )
            )
            kept.append(file)
        return kept, tuple(regions)

    def load(self, category: str) -> DataSplits:
        """Train, the official validation folder, and test with regions."""
        self.check_category(category)
        folder = self.root_path() / category
        train_dir = folder / "train" / "good"
        train_paths = self.images(train_dir)
        self.require_train(train_paths, train_dir)
        validation_dir = folder / "validation" / "good"
        if validation_dir.is_dir():
            train = [self.sample(p, label=0, category=category, split="train") for p in train_paths]
            validation = [self.sample(p, label=0, category=category, split="validation") for p in self.images(validation_dir)]
        else:
            train, validation = self.train_and_validation(train_paths, category)

        config_path = folder / "defects_config.json"
        config: dict[int, dict[str, Any]] | None = None
        test: list[Sample] = []
        for kind_dir in subfolders(folder / "test"):
            kind = kind_dir.name
            for path in self.images(kind_dir):
                if kind == "good":
                    test.append(self.sample(path, label=0, category=category, split="test"))
                    continue
                if not config_path.is_file():
                    raise self.layout_error(f"{config_path} is missing: it maps mask pixel values to defects and saturation thresholds.")
                if config is None:
                    config = read_defects_config(config_path)
                files, regions = self.regions_of(path, folder / "ground_truth" / kind / path.stem, config, config_path)
                union = functools.partial(load_union_mask, tuple(str(f) for f in files), str(path))
                test.append(
                    self.sample(
                        path,
                        label=1,
                        category=category,
                        split="test",
                        defect_type=kind,
                        mask=union,
                        regions=regions,
                        anomaly_kind=ANOMALY_FOLDERS.get(kind, kind.removesuffix("_anomalies")),
                    )
                )
        if not test:
            raise self.layout_error(f"no test images under {folder / 'test'}.")
        return DataSplits(category=category, train=train, validation=validation, test=test, has_masks=True)
