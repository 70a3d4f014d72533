"""The embedded demo: deterministic bytes, atomic cache, MVTec layout, plausible defects."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from vad.errors import VadError
from vad_datasets import demo
from vad_datasets.demo import DemoDataset, build, default_cache_dir
from vad_datasets.synth import DEFECTS, apply_defect


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One demo build shared by this module's tests."""
    return build(tmp_path_factory.mktemp("cache") / "demo-v1")


def _hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_is_byte_identical_every_build(built, tmp_path):
    again = build(tmp_path / "demo-v1")
    assert _hashes(again) == _hashes(built)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["files"] == {k: v for k, v in _hashes(built).items() if k != "manifest.json"}


def test_demo_layout_and_counts(built):
    dataset = DemoDataset(root=str(built), validation_fraction=0.125)
    assert dataset.categories() == ["brick", "grass", "gravel"]
    for category in dataset.categories():
        splits = dataset.load(category)
        assert (len(splits.train), len(splits.validation), len(splits.test)) == (21, 3, 20)
        counts = {d: sum(s.defect_type == d for s in splits.test) for d in ("good", *DEFECTS)}
        assert counts == {"good": 8, "scratch": 4, "stain": 4, "foreign_patch": 4}
        image = splits.test[-1].load_image()
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8


def test_demo_masks_are_exact_and_defects_moderate(built):
    splits = DemoDataset(root=str(built)).load("gravel")
    for sample in splits.test:
        if not sample.label:
            continue
        mask = sample.load_mask()
        assert 0.001 < mask.mean() < 0.15, sample.path  # a visible defect, not the whole crop
        image = sample.load_image()[mask]
        clipped = ((image == 0) | (image == 255)).all(axis=1).mean()
        assert clipped < 1 / 3, sample.path  # mostly not a plain saturated black or white mark


def test_defects_change_exactly_the_masked_pixels():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    clean = rng.uniform(90, 160, (128, 128)).astype(np.float32)
    foreign = rng.uniform(0, 255, (128, 128)).astype(np.float32)
    for kind in DEFECTS:
        damaged, mask = apply_defect(kind, clean, foreign, np.random.default_rng(1))
        change = np.abs(damaged - clean)
        assert 0.001 < mask.mean() < 0.2, kind
        if kind == "scratch":
            assert change[mask].min() >= 10.0 and change[~mask].max() < 10.0
        elif kind == "stain":  # holes where shift and washed-out texture cancel are filled
            assert (change[mask] >= 10.0).mean() > 0.9 and change[~mask].max() < 10.0
        else:  # the patch's soft edge is at most ~1 px outside its mask
            assert change[~ndimage.binary_dilation(mask, iterations=2)].max() == 0
    with pytest.raises(ValueError, match="unknown defect"):
        apply_defect("dent", clean, foreign, rng)


def test_default_cache_location_and_atomic_build(tmp_path, monkeypatch):
    monkeypatch.setenv("VAD_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo-v1"

    def crash(*_, **__):
        raise RuntimeError("power cut")

    monkeypatch.setattr(demo, "generate", crash)
    with pytest.raises(RuntimeError):
        DemoDataset().categories()
    assert list(tmp_path.iterdir()) == []  # no half-built cache left behind


def test_incomplete_cache_is_rebuilt(built, tmp_path, monkeypatch):
    folder = tmp_path / "demo-v1"
    (folder / "brick").mkdir(parents=True)  # a stale, manifest-less folder
    files = {"LICENSE.txt": b"x"}
    monkeypatch.setattr(demo, "generate", lambda: files)
    build(folder)
    assert (folder / "manifest.json").is_file() and not (folder / "brick").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demo-v1"]


def test_demo_never_overwrites_a_foreign_folder(tmp_path):
    precious = tmp_path / "my-data"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(VadError, match="is not a vad demo data set"):
        DemoDataset(root=str(precious)).categories()
    assert (precious / "thesis.txt").read_text() == "keep me"


def test_expected_paths_match_a_build(built):
    assert demo.expected_paths() == set(_hashes(built))


def test_cache_drawn_by_other_code_is_rebuilt(built, tmp_path, monkeypatch):
    folder = tmp_path / "demo-v1"
    monkeypatch.setattr(demo, "generate", lambda: {"LICENSE.txt": b"x"})
    build(folder)
    assert demo.is_complete(folder)
    monkeypatch.setattr(demo, "generator_fingerprint", lambda: "other code")
    assert not demo.is_complete(folder)
    build(folder)
    assert json.loads((folder / "manifest.json").read_text())["generator"] == "other code"
