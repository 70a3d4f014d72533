"""benchmarks/loco_data.py: a tiny generated MVTec LOCO AD set reads with the mvtec-loco data set."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vad_datasets.loco import MVTecLOCO, read_defects_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "loco_data.py"
TINY = {"train": 3, "validation": 2, "test_good": 2, "test_structural": 2, "test_logical": 2, "size": 64}


@pytest.fixture(scope="module")
def loco_data():
    spec = importlib.util.spec_from_file_location("loco_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("loco_data", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_root(loco_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("loco") / "data"
    loco_data.build(root, **TINY)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_category_reads_with_regions(loco_data, tiny_root):
    dataset = MVTecLOCO(root=str(tiny_root))
    for category in loco_data.CATEGORIES:
        splits = dataset.load(category)
        assert (len(splits.train), len(splits.validation)) == (3, 2)
        config = read_defects_config(tiny_root / category / "defects_config.json")
        names = {entry["defect_name"] for entry in config.values()}
        kinds = [s.anomaly_kind for s in splits.test]
        assert kinds.count(None) == 2 and kinds.count("structural") == 2 and kinds.count("logical") == 2
        for sample in splits.test:
            if sample.label == 0:
                continue
            assert sample.regions, sample.path
            for region in sample.regions:
                assert region.defect_name in names
                assert region.load_mask().sum() > 0 and region.saturation_area > 0
            assert sample.load_mask().shape == (64, 64)
        # structural defects saturate at relative 1.0 (plain PRO)
        structural = loco_data.DEFECTS[category]["structural"]
        assert all(e["relative_saturation"] and e["saturation_threshold"] == 1.0 for e in config.values() if e["defect_name"] in structural)


def test_same_arguments_same_bytes_and_rebuild_skipped(loco_data, tiny_root, tmp_path):
    again = tmp_path / "again"
    loco_data.build(again, **TINY)
    assert _files(again) == _files(tiny_root)
    marker = again / loco_data.MARKER
    assert json.loads(marker.read_text())["size"] == 64
    stamp = marker.stat().st_mtime_ns
    loco_data.build(again, **TINY)  # same arguments: nothing rewritten
    assert marker.stat().st_mtime_ns == stamp
    loco_data.build(again, **{**TINY, "seed": 7, "categories": ("pushpins",)})  # other arguments: replaced
    assert sorted(p.name for p in again.iterdir()) == ["LICENSE.txt", loco_data.MARKER, "pushpins"]
    assert not list(tmp_path.glob(".again*"))  # no staging folder left behind


def test_refuses_a_foreign_folder(loco_data, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        loco_data.build(tmp_path, **TINY)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
