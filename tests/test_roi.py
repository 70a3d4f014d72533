"""Regions of interest: masks from PNGs and polygons, the two modes, pixel metrics inside the
ROI only, saved with the model, the same scores from predict and the exported graph, and the
errors a bad ROI gets before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vad.config import RunConfig, load_config
from vad.contracts import DataSplits, Sample
from vad.errors import VadError
from vad.model import AnomalyModel
from vad.pipeline import category_roi, run
from vad.roi import Roi, polygon_mask, read_roi_mask


LEFT_OUT = [[[0, 0], [16, 0], [16, 64], [0, 64]]]  # the left quarter of a 64 px image


@pytest.fixture
def registry(report_registry):
    return report_registry


def config(tmp_path: Path, **changes) -> RunConfig:
    base = dict(
        dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu",
        categories=["tiny-a"], report=False, output=str(tmp_path / "run"),
    )
    return RunConfig(**{**base, **changes})


def inspected_right_part() -> list:
    """Polygons of the right half (the moving part stays in the left quarter; the margin is what
    a feature grid of stride 8, its upsampling and the blur spread it by)."""
    return [[[32, 0], [64, 0], [64, 64], [32, 64]]]


def test_polygon_mask_agrees_with_matplotlib():
    from matplotlib.path import Path as PolygonPath

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:30, 0:40]
    centres = np.column_stack([xs.ravel() + 0.5, ys.ravel() + 0.5])
    for _ in range(20):
        polygon = rng.uniform(-5, 45, (int(rng.integers(3, 8)), 2))  # any shape, self-intersecting too
        expected = PolygonPath(polygon).contains_points(centres).reshape(30, 40)
        mask = polygon_mask([polygon.tolist()], (30, 40))
        on_edge = np.abs(mask ^ expected).sum()
        assert on_edge <= 2  # only pixel centres exactly on an edge may differ


def test_bad_roi_specs_get_clear_errors(tmp_path):
    with pytest.raises(VadError, match="no mask file"):
        read_roi_mask(str(tmp_path / "missing.png"), (64, 64), "tiny-a")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(VadError, match="32x32 px .* training images are 64x64"):
        read_roi_mask(str(tmp_path / "small.png"), (64, 64), "tiny-a")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(VadError, match="is empty"):
        read_roi_mask(str(tmp_path / "empty.png"), (64, 64), "tiny-a")
    with pytest.raises(VadError, match="at least three"):
        read_roi_mask([[[0, 0], [5, 5]]], (64, 64), "tiny-a")
    with pytest.raises(VadError, match="non-empty list"):
        read_roi_mask({"x": 1}, (64, 64), "tiny-a")
    with pytest.raises(VadError, match="mode must be one of"):
        Roi(np.ones((4, 4), bool), "during")
    with pytest.raises(VadError, match="roi_mode must be one of"):
        load_config(None, {"detectors": ["patchcore"], "roi_mode": "during"})
    with pytest.raises(VadError, match="keeps its own region of interest"):
        load_config(None, {"detectors": ["patchcore"], "roi": "roi.png", "model": "somewhere"})
    splits = DataSplits("tiny-a", [Sample("memory://a", 0, "tiny-a", "train", image_loader=lambda: np.zeros((64, 64, 3), np.uint8))], [], [])
    with pytest.raises(VadError, match="no region for category 'tiny-a'"):
        category_roi(RunConfig(roi={"tiny-b": LEFT_OUT}), splits)
    other = Sample("memory://b", 0, "tiny-a", "test", image_loader=lambda: np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(VadError, match="48x64 px .* set on 64x64"):
        category_roi(RunConfig(roi={"*": LEFT_OUT}), DataSplits("tiny-a", splits.train, [], [other]))


def test_pixel_metrics_inside_a_rectangle_equal_the_metrics_of_the_cropped_maps():
    from vad_metrics import pixel, pro

    rng = np.random.default_rng(3)
    maps = [rng.random((20, 30)) for _ in range(6)]
    masks = [None, None, *(rng.random((20, 30)) > 0.8 for _ in range(4))]
    roi = np.zeros((20, 30), bool)
    roi[4:17, 6:25] = True
    cropped_maps = [m[4:17, 6:25] for m in maps]
    cropped_masks = [None if m is None else m[4:17, 6:25] for m in masks]
    assert pixel.auroc_from_split(*pixel.split_pixels(maps, masks, roi)) == pixel.auroc_from_split(*pixel.split_pixels(cropped_maps, cropped_masks))
    assert pro.au_pro(maps, masks, 0.3, roi) == pytest.approx(pro.au_pro(cropped_maps, cropped_masks, 0.3))
    assert pixel.iou_at(maps, masks, 0.7, roi) == pixel.iou_at(cropped_maps, cropped_masks, 0.7)
    assert pixel.pro_at_threshold_anomalib(maps, masks, 0.7, roi) == pixel.pro_at_threshold_anomalib(cropped_maps, cropped_masks, 0.7)
    assert pixel.auroc_from_split(*pixel.split_pixels(maps, masks)) != pixel.auroc_from_split(*pixel.split_pixels(maps, masks, roi))


def with_moving_part(sample: Sample, rng: np.random.Generator) -> Sample:
    """The sample with a bright bar somewhere in the left quarter (a cable that moves)."""  # columns 4-11
    top = int(rng.integers(0, 40))
    original = sample.image_loader

    def load() -> np.ndarray:
        image = original()
        image[top : top + 20, 4:12] = 255
        return image

    return Sample(sample.path.replace("good", "good-moved"), sample.label, sample.category, sample.split, sample.defect_type, image_loader=load, mask_loader=sample.mask_loader)


@pytest.mark.parametrize("mode", ["after", "before"])
def test_a_moving_part_outside_the_roi_no_longer_raises_false_alarms(registry, mode):
    from vad.build import build_model
    from vad.testing import make_tiny_splits

    splits = make_tiny_splits("tiny-a", train=12, validation=0)
    rng = np.random.default_rng(0)
    good = [s for s in splits.test if s.label == 0]
    moved = [with_moving_part(s, rng) for s in good]
    flagged = {}
    for roi in (None, Roi(polygon_mask(inspected_right_part(), (64, 64)), mode)):
        model = build_model(config(Path("unused")), registry)
        model.roi = roi
        model.fit(splits.train)
        flagged[roi is not None] = sum(bool(o.anomalous) for o in model.predict(moved))
    assert flagged[False] == len(moved)  # every shot with the cable in view is a false alarm
    assert flagged[True] <= 1


@pytest.mark.parametrize("mode", ["after", "before"])
def test_the_roi_is_saved_and_predict_and_the_exported_graph_give_the_run_scores(registry, tmp_path, mode):
    from vad.export import check_parity, export_onnx

    folder, results = run(config(tmp_path, roi={"*": inspected_right_part()}, roi_mode=mode, report=True), registry)
    model = AnomalyModel.load(folder / "tiny-a" / "model", "cpu", registry)
    assert model.roi is not None and model.roi.mode == mode and model.roi.mask[:, :32].sum() == 0 and model.roi.mask[:, 32:].all()
    scores = [float(line.split(",")[4]) for line in (folder / "tiny-a" / "scores.csv").read_text().splitlines()[1:]]
    from vad.testing import make_tiny_splits

    again = [o.score for o in model.predict(make_tiny_splits("tiny-a").test)]
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-6)
    description = export_onnx(model, tmp_path / "roi.onnx")
    assert description["input"]["shape"] == ["batch", 3, 64, 64] and description["roi"]["mode"] == mode
    images = [np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8) for seed in range(3)]
    assert check_parity(model, tmp_path / "roi.onnx", images) < 1e-4
    with pytest.raises(VadError, match="export it for that --input-size"):
        export_onnx(model, tmp_path / "other.onnx", input_size=(32, 32))
    assert "region of interest" in (folder / "report.html").read_text()


def test_an_roi_the_model_cannot_honour_is_refused_before_the_run_folder_exists(registry, tmp_path):
    with pytest.raises(VadError, match="cannot be combined with tiles"):
        run(config(tmp_path, roi={"*": inspected_right_part()}, tile=32), registry)
    assert not (tmp_path / "run").exists()


def test_predict_scores_images_of_the_roi_size_and_refuses_the_others_one_by_one(registry, tmp_path):
    from vad.predict import predict_images

    folder, _ = run(config(tmp_path, roi={"*": inspected_right_part()}), registry)
    model = AnomalyModel.load(folder / "tiny-a" / "model", "cpu", registry)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "fits.png")
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "other.png")
    records = {Path(r["path"]).name: r for r in predict_images(model, [str(tmp_path / "fits.png"), str(tmp_path / "other.png")]).records}
    assert records["fits.png"]["error"] is None and records["fits.png"]["score"] is not None
    assert "region of interest was set on 64x64" in records["other.png"]["error"]


def test_before_mode_leaves_the_outside_out_of_patchcores_bank_and_out_of_the_score(registry):
    from vad.build import build_model
    from vad.testing import make_tiny_splits

    splits = make_tiny_splits("tiny-a", train=12, validation=0)
    rng = np.random.default_rng(1)
    moved = [with_moving_part(s, rng) for s in splits.test if s.label == 0]
    banks = {}
    for roi in (None, Roi(polygon_mask(inspected_right_part(), (64, 64)), "before")):
        model = build_model(config(Path("unused"), detectors=["patchcore"], backbones=["fake-backbone"], threshold="max"), registry)
        model.roi = roi
        model.fit(splits.train)
        detector = model.members[0].detector
        banks[roi is not None] = detector.memory_bank.shape[0]
        if roi is not None:
            assert sum(bool(o.anomalous) for o in model.predict(moved)) <= 1
            assert all(o.map[:, :24].max() <= o.map[:, 32:].min() for o in model.predict(moved[:2]))  # outside: the inside's minimum
    assert banks[True] < banks[False]
