"""MVTec LOCO AD: multi-file masks, merged masks, regions and saturation areas."""

from __future__ import annotations

import json

import pytest

from vad_datasets.base import LayoutError, MaskSizeError
from vad_datasets.loco import MVTecLOCO, saturation_area


def _by_name(splits):
    return {s.path.split("test/")[1]: s for s in splits.test}


def test_loco_splits_kinds_and_counts(tmp_path, trees):
    trees.loco(tmp_path)
    splits = MVTecLOCO(root=str(tmp_path)).load("pushpins")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (6, 2, 4)  # official validation folder
    tests = _by_name(splits)
    assert tests["good/000.png"].label == 0 and tests["good/000.png"].anomaly_kind is None
    assert tests["structural_anomalies/000.png"].anomaly_kind == "structural"
    assert tests["logical_anomalies/000.png"].anomaly_kind == "logical"
    assert tests["logical_anomalies/000.png"].defect_type == "logical_anomalies"


def test_loco_merged_mask_and_regions_with_saturation(tmp_path, trees):
    trees.loco(tmp_path)
    tests = _by_name(MVTecLOCO(root=str(tmp_path)).load("pushpins"))
    two = tests["logical_anomalies/000.png"]
    assert two.load_mask().sum() == 100 + 16  # union of both annotation files
    assert [(r.defect_name, r.saturation_area) for r in two.regions] == [("additional_pushpin", 40.0), ("missing_pushpin", 16.0)]
    assert [int(r.load_mask().sum()) for r in two.regions] == [100, 16]
    structural = tests["structural_anomalies/000.png"]
    assert [(r.defect_name, r.saturation_area) for r in structural.regions] == [("broken_pushpin", 30.0)]  # relative 1.0 = PRO
    relative = tests["logical_anomalies/001.png"]
    assert relative.regions[0].saturation_area == 38.0  # int(0.55 * 70)


def test_saturation_area_rules():
    assert saturation_area(70, 0.55, relative=True) == 38.0
    assert saturation_area(16, 40, relative=False) == 16.0
    assert saturation_area(100, 40, relative=False) == 40.0


def test_loco_missing_config_unknown_value_and_missing_masks(tmp_path, trees):
    trees.loco(tmp_path)
    folder = tmp_path / "pushpins"
    config = json.loads((folder / "defects_config.json").read_text())
    (folder / "defects_config.json").write_text(json.dumps(config[1:]))
    with pytest.raises(LayoutError, match="pixel value 10, which .*defects_config.json does not define"):
        MVTecLOCO(root=str(tmp_path)).load("pushpins")
    (folder / "defects_config.json").unlink()
    with pytest.raises(LayoutError, match="defects_config.json is missing"):
        MVTecLOCO(root=str(tmp_path)).load("pushpins")
    (folder / "defects_config.json").write_text(json.dumps(config))
    for file in (folder / "ground_truth" / "logical_anomalies" / "001").iterdir():
        file.unlink()
    with pytest.raises(LayoutError, match=r"001.png has no mask: expected one or more PNGs"):
        MVTecLOCO(root=str(tmp_path)).load("pushpins")


def test_loco_bad_config_entry(tmp_path, trees):
    trees.loco(tmp_path)
    (tmp_path / "pushpins" / "defects_config.json").write_text(json.dumps([{"defect_name": "x"}]))
    with pytest.raises(LayoutError, match="needs defect_name, pixel_value"):
        MVTecLOCO(root=str(tmp_path)).load("pushpins")


def test_loco_region_mask_size_mismatch(tmp_path, trees):
    trees.loco(tmp_path)
    trees.write_mask(tmp_path / "pushpins" / "ground_truth" / "logical_anomalies" / "000" / "001.png", box=(0, 0, 4, 4), size=(12, 12), value=30)
    sample = _by_name(MVTecLOCO(root=str(tmp_path)).load("pushpins"))["logical_anomalies/000.png"]
    with pytest.raises(MaskSizeError, match="001.png is 12x12"):
        sample.load_mask()


def test_loco_wrong_root(tmp_path):
    with pytest.raises(LayoutError, match="defects_config.json") as error:
        MVTecLOCO(root=str(tmp_path)).categories()
    assert "mvtec-loco" in str(error.value)


def test_loco_category_with_the_wrong_inside_says_what_is_missing(tmp_path, trees):
    trees.loco(tmp_path)
    (tmp_path / "pushpins" / "train").rename(tmp_path / "pushpins" / "training")
    with pytest.raises(LayoutError, match=r"category folder .*pushpins has no train/good/ \(found in .*pushpins: ground_truth/, test/, training/, validation/, 1 file\)"):
        MVTecLOCO(root=str(tmp_path)).load("pushpins")
    with pytest.raises(LayoutError, match=r"no category folder found under .*: a category folder holds train/good/, but .*pushpins has no train/good/"):
        MVTecLOCO(root=str(tmp_path)).categories()
