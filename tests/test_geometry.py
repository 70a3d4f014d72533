"""Input geometry (vad.geometry): --image-size, --resize/--center-crop, --keep-aspect and tiling,
through fit, calibration, predict, save/load and ONNX export, for any detector."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from vad import hookimpl
from vad.build import build_model
from vad.config import load_config
from vad.contracts import Detector, Prediction, Preprocessing, Sample, State
from vad.errors import VadError
from vad.geometry import Geometry, TileLayout, blend_window, keep_aspect_size, parse_size, stitch_operator, tile_starts
from vad.model import AnomalyModel
from vad.pipeline import run
from vad.testing import make_tiny_splits
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "contrib" / "plugin-template"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import vad_template  # noqa: E402
from report_plugin import ReportTestPlugin  # noqa: E402


# --------------------------------------------------------------------------- a spy image detector


class SpyImages(Detector):
    """An image detector that records what it is given: its map is the mean brightness of 4x4
    cells, its score the map maximum; it scores training images 'left out' as it scores others."""

    name = "spy-images"
    input = "images"
    leave_one_out = True
    tiny_image_auroc = None
    preprocessing = Preprocessing(size=(40, 40), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.seen: list[tuple[int, ...]] = []
        self.fit_batches: list[tuple[int, ...]] = []
        self.left_out: list[torch.Tensor] = []
        self._fitted = False

    @property
    def fitted(self) -> bool:
        return self._fitted

    def fit(self, batches) -> None:
        for batch in batches:
            self.seen.append(tuple(batch.shape))
            self.fit_batches.append(tuple(batch.shape))
        self._fitted = True

    def predict(self, batch: torch.Tensor) -> Prediction:
        self.seen.append(tuple(batch.shape))
        maps = torch.nn.functional.avg_pool2d(batch.mean(1, keepdim=True), 4)[:, 0]
        return Prediction(maps.flatten(1).amax(1), maps)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        self.left_out.append(indices.clone())
        return self.predict(batch)

    def state(self) -> State:
        return State({"fitted": True})

    def load_state(self, state: State) -> None:
        self._fitted = True


class SpyPlugin:
    @hookimpl
    def vad_register_detectors(self, register):
        register(SpyImages)


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(vad_template, name="template-under-test"), register_plugin(ReportTestPlugin(), name="report-test"), register_plugin(SpyPlugin(), name="spy") as registry:
        yield registry


def memory_sample(image: np.ndarray, index: int = 0, split: str = "train") -> Sample:
    return Sample(path=f"memory://geometry/{split}/{index:03d}.png", label=0, category="geometry", split=split, image_loader=lambda: image.copy())


# --------------------------------------------------------------------------- tiles and stitching


@pytest.mark.parametrize(("length", "tile", "stride"), [(64, 64, 64), (64, 32, 32), (100, 32, 32), (100, 32, 20), (129, 64, 7), (50, 1, 1)])
def test_tiles_cover_the_image_and_the_last_one_is_aligned_to_the_border(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    assert starts[0] == 0 and starts[-1] == length - tile
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    gaps = np.diff(starts)
    assert (gaps[:-1] == stride).all() and (gaps <= stride).all() and (gaps > 0).all()
    layout = TileLayout((length, length), tile, stride)
    assert layout.count == len(starts) ** 2
    assert layout.overlapping == (length != tile and (stride < tile or (length - tile) % stride != 0))


def test_cut_takes_static_tiles_image_after_image_row_major():
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    layout = TileLayout((10, 12), 6, 4)
    assert layout.rows == (0, 4) and layout.cols == (0, 4, 6)
    tiles = layout.cut(images)
    assert tiles.shape == (2 * 6, 3, 6, 6)
    for index, (top, left) in enumerate(layout.positions):
        assert torch.equal(tiles[6 + index], images[1, :, top : top + 6, left : left + 6])
    with pytest.raises(VadError, match="tiling expects 10x12 images"):
        layout.cut(images[..., :11])


@pytest.mark.parametrize(("size", "tile", "stride"), [((64, 64), 32, 32), ((64, 64), 32, 16), ((70, 90), 32, 32), ((70, 90), 40, 13), ((32, 32), 32, 32)])
def test_stitching_tiles_cut_from_any_map_gives_that_map_back_exactly(size, tile, stride):
    """The blend is a weighted average with weights summing to one: tiles that agree (cut from one
    map at full resolution: random, constant, a ramp) stitch back to that very map."""
    layout = TileLayout(size, tile, stride)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    maps = torch.stack([
        torch.rand(size, generator=torch.Generator().manual_seed(0)),
        torch.full(size, 3.25),
        (0.5 * yy + 0.25 * xx).float(),
    ])
    tiles = layout.cut(maps[:, None])[:, 0]
    torch.testing.assert_close(layout.stitch(tiles), maps, rtol=0, atol=1e-5)


def test_stitching_upsamples_grid_maps_like_the_untiled_path():
    """One tile covering the image: the stitched map is the tile's grid map upsampled bilinearly
    (what post-processing does without tiles); grid maps of a constant stitch to the constant."""
    grid = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(1))
    single = TileLayout((40, 40), 40, 40)
    expected = torch.nn.functional.interpolate(grid[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(single.stitch(grid), expected, rtol=0, atol=1e-6)
    overlapping = TileLayout((70, 90), 40, 25)
    constant = torch.full((2 * overlapping.count, 5, 5), 0.75)
    torch.testing.assert_close(overlapping.stitch(constant), torch.full((2, 70, 90), 0.75), rtol=0, atol=1e-6)


def test_overlapping_tiles_that_disagree_blend_without_seams():
    """Each tile a different constant: where one tile covers a pixel it keeps its value; where
    tiles overlap the Hann weights pass from one to the next gradually. Adjacent pixels differ
    by a small fraction of the tiles' difference (plain averaging would jump by half of it, hard
    placement by all of it)."""
    layout = TileLayout((96, 96), 32, 16)
    values = torch.rand(layout.count, generator=torch.Generator().manual_seed(2)) * 10
    tiles = values[:, None, None].expand(-1, 32, 32).contiguous()
    stitched = layout.stitch(tiles)[0]
    steps = max(float(stitched.diff(dim=axis).abs().max()) for axis in (0, 1))
    largest_difference = float(values.max() - values.min())
    assert steps < 0.15 * largest_difference
    assert float(stitched[0, 0]) == pytest.approx(float(values[0]), abs=1e-5)  # a corner only the first tile covers
    weights = blend_window(32)
    assert weights.min() > 0 and weights[0] < 0.01 and weights[15] > 0.99 and np.allclose(weights, weights[::-1])
    operator = stitch_operator(96, 32, 16, 4)
    np.testing.assert_allclose(operator @ np.ones(operator.shape[1]), 1.0, atol=1e-12)  # a partition of unity


def test_image_prediction_is_the_stitched_map_and_its_maximum():
    layout = TileLayout((16, 16), 8, 8)
    maps = torch.zeros(2 * 4, 2, 2)
    maps[5, 1, 1] = 7.0  # second image, second tile
    prediction = layout.image_prediction(Prediction(torch.arange(8.0), maps))
    assert prediction.maps.shape == (2, 16, 16)
    assert prediction.scores.tolist() == pytest.approx([0.0, float(prediction.maps[1].max())])
    assert 0 < float(prediction.scores[1]) <= 7.0
    image_level = layout.image_prediction(Prediction(torch.tensor([1.0, 5, 2, 3, 0, 0, 9, 1]), None))
    assert image_level.maps is None and image_level.scores.tolist() == [5.0, 9.0]


# --------------------------------------------------------------------------- the Geometry object


def test_sizes_parse_from_numbers_text_and_lists():
    assert parse_size(320, "--image-size") == (320, 320)
    assert parse_size("256,320", "--image-size") == (256, 320)
    assert parse_size("256x320", "--image-size") == (256, 320)
    assert parse_size([224], "--image-size") == (224, 224)
    assert parse_size(None, "--image-size") is None
    for bad in ("0", "a,b", "1,2,3", [1.5, 2], True, -3):
        with pytest.raises(VadError, match="--image-size expects HEIGHT"):
            parse_size(bad, "--image-size")


def test_keep_aspect_rounds_the_longer_side_to_a_multiple_of_32():
    assert keep_aspect_size(256, (1000, 1600)) == (256, 416)  # 409.6 -> 416
    assert keep_aspect_size(256, (1600, 1000)) == (416, 256)
    assert keep_aspect_size(100, (128, 128)) == (100, 100)  # never below the shorter side
    assert keep_aspect_size(100, (128, 200)) == (100, 160)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"center_crop": 224}, "--center-crop needs --resize"),
        ({"resize": 256}, "--resize goes with --center-crop"),
        ({"resize": 200, "center_crop": 224}, "larger than --resize"),
        ({"resize": [256, 200], "center_crop": [224, 224]}, "larger than --resize"),
        ({"image_size": 320, "resize": 256, "center_crop": 224}, "use one of them"),
        ({"keep_aspect": True}, "--keep-aspect needs --image-size"),
        ({"keep_aspect": True, "image_size": [256, 320]}, "one number, the shorter side"),
        ({"tile_stride": 32}, "--tile-stride needs --tile"),
        ({"tile": 64, "tile_stride": 65}, "would leave gaps"),
        ({"tile": 0}, "--tile expects a whole number"),
        ({"tile": 64.5}, "--tile expects a whole number"),
        ({"tile": 400, "image_size": 320}, "larger than the 320x320 image"),
        ({"tile": 300, "resize": 320, "center_crop": 224}, "larger than the 224x224 image"),
        ({"tile": 300, "image_size": 256, "keep_aspect": True}, "larger than the shorter side"),
        ({"image_size": "big"}, "--image-size expects"),
    ],
)
def test_bad_geometry_values_are_clear_errors(values, message):
    with pytest.raises(VadError, match=message):
        Geometry.create(**values)


def test_geometry_sets_each_members_preprocessing_and_round_trips_through_model_json():
    native = Preprocessing(size=(224, 224), mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    assert Geometry().preprocessing(native) is native and not Geometry().active
    sized = Geometry.create(image_size="320,256").preprocessing(native)
    assert (sized.size, sized.resize, sized.crop, sized.mean, sized.interpolation) == ((320, 256), None, False, native.mean, "bicubic")
    cropped = Geometry.create(resize=256, center_crop=224).preprocessing(native)
    assert (cropped.size, cropped.resize, cropped.crop) == ((224, 224), (256, 256), True)
    tiled = Geometry.create(tile=128, tile_stride=64)
    with pytest.raises(VadError, match="decided at fit"):
        tiled.preprocessing(native)
    resolved = tiled.resolved((300, 400))
    assert resolved.working_size == (300, 400) and resolved.layout().count == 4 * 6
    assert Geometry.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved
    assert Geometry.from_dict(None) == Geometry() == Geometry.from_dict({})
    with pytest.raises(VadError, match="larger than the 100x400 working image"):
        Geometry.create(tile=128).resolved((100, 400))


def test_the_configuration_validates_and_saves_the_geometry(tmp_path):
    config = load_config(None, {"image_size": "320", "tile": 128, "tile_stride": 64})
    assert config.image_size == [320, 320] and config.tile == 128
    assert yaml.safe_load(yaml.safe_dump(config.to_dict()))["image_size"] == [320, 320]
    file = tmp_path / "run.yaml"
    file.write_text("resize: [256, 256]\ncenter_crop: 224\n")
    config = load_config(str(file), {})
    assert config.resize == [256, 256] and config.center_crop == [224, 224]
    with pytest.raises(VadError, match="larger than --resize"):
        load_config(None, {"resize": "200", "center_crop": "224"})
    with pytest.raises(VadError, match="would leave gaps"):
        load_config(None, {"tile": 64, "tile_stride": 100})


# --------------------------------------------------------------------------- through the model


def grid_shape(model: AnomalyModel) -> tuple[int, int]:
    return tuple(model.members[0].detector.mean.shape[-2:])


@pytest.mark.parametrize(
    ("geometry", "grid"),
    [({}, (8, 8)), ({"image_size": [96, 80]}, (12, 10)), ({"resize": [80, 80], "center_crop": [64, 48]}, (8, 6)), ({"tile": 32}, (4, 4)), ({"image_size": 128, "tile": 64, "tile_stride": 32}, (8, 8))],
)
def test_image_size_resize_crop_and_tiles_reach_a_feature_detector(registry, tmp_path, geometry, grid, one_torch_thread):
    """The fake backbone's stride-8 grid says what input size the detector saw (64 px by default)."""
    model = build_model(tiny_config(tmp_path, **geometry), registry)
    splits = make_tiny_splits()
    model.fit(splits.train, splits.validation)
    assert grid_shape(model) == grid
    outputs = list(model.predict(splits.test[:3]))
    assert all(o.map.shape == (64, 64) for o in outputs)  # maps at the original size


@pytest.mark.parametrize(
    ("geometry", "seen"),
    [({}, (40, 40)), ({"image_size": [48, 32]}, (48, 32)), ({"resize": 64, "center_crop": [32, 48]}, (32, 48)), ({"tile": 32, "tile_stride": 16}, (32, 32))],
)
def test_an_image_detector_gets_the_geometry_instead_of_its_own_size(registry, tmp_path, geometry, seen, one_torch_thread):
    model = build_model(tiny_config(tmp_path, detectors=["spy-images"], backbones=[], **geometry), registry)
    splits = make_tiny_splits()
    model.fit(splits.train, splits.validation)
    detector = model.members[0].detector
    assert {shape[1:] for shape in detector.seen} == {(3, *seen)}
    if "tile" in geometry:  # 64 px images: 3 x 3 tiles of 32 px, 16 apart, batch_size (8) tiles at a time
        assert sum(shape[0] for shape in detector.fit_batches) == len(splits.train) * 9
        assert max(shape[0] for shape in detector.seen) == model.batch_size
    assert [o.map.shape for o in model.predict(splits.test[:2])] == [(64, 64), (64, 64)]


def test_a_single_tile_covering_the_image_gives_the_untiled_map(registry, tmp_path, one_torch_thread):
    splits = make_tiny_splits()
    plain = build_model(tiny_config(tmp_path), registry)
    tiled = build_model(tiny_config(tmp_path, tile=64), registry)
    for model in (plain, tiled):
        model.fit(splits.train, splits.validation)
    assert tiled.geometry.layout().count == 1
    plain_outputs, tiled_outputs = list(plain.predict(splits.test)), list(tiled.predict(splits.test))
    for a, b in zip(plain_outputs, tiled_outputs):
        np.testing.assert_allclose(a.map, b.map, rtol=0, atol=1e-5)
    # the tiled score is the maximum of the stitched map: the grid map upsampled to the tile, before the blur
    images = [s.load_image() for s in splits.test]
    grid = plain._member_outputs(plain.members, splits.test, images)[0].maps
    upsampled = torch.nn.functional.interpolate(grid[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert [b.score for b in tiled_outputs] == pytest.approx(upsampled.amax(dim=(1, 2)).tolist(), rel=1e-5)


def _stitched_map(model: AnomalyModel, image: np.ndarray) -> np.ndarray:
    tiles = model._member_outputs(model.members, [memory_sample(image)], [image])[0]
    return model._image_level(tiles).maps[0].numpy()


@pytest.mark.parametrize("kind", ["constant", "ramp"])
def test_stitched_maps_of_a_constant_or_ramp_image_have_no_seams(registry, tmp_path, kind, one_torch_thread):
    """Measured on the stitched map (before the blur hides anything): with overlapping tiles, the
    steps between adjacent pixels at tile borders are a fraction of the steps inside one tile's
    own map, so stitching adds no discontinuity. Tiles that do not overlap meet with the tiles'
    own edge effects (zero padding), which the same measure shows as seams."""
    yy, xx = np.mgrid[0:128, 0:128]
    gray = np.full((128, 128), 0.5) if kind == "constant" else 0.2 + 0.6 * (xx + yy) / 256
    image = (np.repeat(gray[..., None], 3, axis=2) * 255).astype(np.uint8)
    splits = make_tiny_splits(size=128)
    measured = {}
    for stride in (32, 64):
        model = build_model(tiny_config(tmp_path, tile=64, tile_stride=stride), registry)
        model.fit(splits.train, [])
        layout = model.geometry.layout()
        tiles = model._member_outputs(model.members, [memory_sample(image)], [image])[0]
        inside = torch.nn.functional.interpolate(tiles.maps[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        inner_step = float(inside.diff(dim=2).abs().max())
        stitched = _stitched_map(model, image)
        steps = np.abs(np.diff(stitched, axis=1))  # steps[:, x]: between columns x and x + 1
        borders = sorted({s - 1 for s in layout.cols if s > 0} | {s + 63 for s in layout.cols if s + 64 < 128})
        measured[stride] = (max(float(steps[:, b].max()) for b in borders), float(steps.max()), inner_step)
    border, largest, inner = measured[32]
    assert border < 0.5 * inner and largest <= inner * 1.01
    assert measured[64][0] > 2 * measured[64][2]  # the measure does see seams where there are some


def test_leave_one_out_leaves_one_tile_out_and_overlapping_tiles_cross_fit(registry, tmp_path, one_torch_thread):
    splits = make_tiny_splits()
    model = build_model(tiny_config(tmp_path, detectors=["spy-images"], backbones=[], tile=32), registry)
    model.fit(splits.train, [])
    assert model.calibration["method"] == "leave-one-out"
    indices = torch.cat(model.members[0].detector.left_out)
    assert indices.tolist() == list(range(len(splits.train) * 4))  # tile positions in fit order
    for stride, size in ((16, None), (None, 80)):  # overlapping: a stride below the tile, or the border-aligned last tile
        geometry = {"tile": 32, "tile_stride": stride, "image_size": size}
        overlapping = build_model(tiny_config(tmp_path, detectors=["spy-images"], backbones=[], **geometry), registry)
        overlapping.fit(splits.train, [])
        assert overlapping.geometry.overlapping and overlapping.calibration["method"] == "cross-fit"
        assert not overlapping.members[0].detector.left_out
    explicit = build_model(tiny_config(tmp_path, detectors=["spy-images"], backbones=[], tile=32, tile_stride=16, calibration="leave-one-out"), registry)
    with pytest.raises(VadError, match="tiles overlap.*cross-fit"):
        explicit.fit(splits.train, [])


def test_keep_aspect_follows_the_training_images_and_refuses_another_aspect(registry, tmp_path, one_torch_thread):
    rng = np.random.default_rng(0)
    train = [memory_sample(rng.integers(0, 256, (64, 100, 3), dtype=np.uint8), i) for i in range(4)]
    model = build_model(tiny_config(tmp_path, detectors=["spy-images"], backbones=[], image_size=48, keep_aspect=True, calibration="hold-out"), registry)
    model.fit(train, [])
    assert model.geometry.working_size == (48, 64)  # 48 * 100 / 64 = 75 -> 64
    assert {shape[2:] for shape in model.members[0].detector.seen} == {(48, 64)}
    same_aspect = memory_sample(rng.integers(0, 256, (128, 200, 3), dtype=np.uint8), 9, "test")
    assert next(model.predict([same_aspect])).map.shape == (128, 200)
    portrait = memory_sample(rng.integers(0, 256, (100, 64, 3), dtype=np.uint8), 10, "test")
    with pytest.raises(VadError, match=r"memory://geometry/test/010.png is 100x64 px.*works at 48x64"):
        list(model.predict([portrait]))


def test_a_saved_tiled_model_loads_and_predicts_the_same(registry, tmp_path, one_torch_thread):
    splits = make_tiny_splits()
    model = build_model(tiny_config(tmp_path, image_size=96, tile=48, tile_stride=32), registry)
    model.fit(splits.train, splits.validation)
    model.save(tmp_path / "m", registry)
    document = json.loads((tmp_path / "m" / "model.json").read_text())
    assert document["geometry"]["tile"] == 48 and document["geometry"]["working_size"] == [96, 96]
    assert document["members"][0]["preprocessing"]["size"] == [64, 64]  # the member's own, as before
    loaded = AnomalyModel.load(tmp_path / "m", "cpu", registry)
    assert loaded.geometry == model.geometry
    for a, b in zip(model.predict(splits.test), loaded.predict(splits.test)):
        assert a.score == b.score and np.array_equal(a.map, b.map)


def test_a_model_folder_without_geometry_behaves_as_before(registry, tmp_path, one_torch_thread):
    splits = make_tiny_splits()
    model = build_model(tiny_config(tmp_path), registry)
    model.fit(splits.train, splits.validation)
    model.save(tmp_path / "m", registry)
    document = json.loads((tmp_path / "m" / "model.json").read_text())
    assert "geometry" not in document
    loaded = AnomalyModel.load(tmp_path / "m", "cpu", registry)
    assert loaded.geometry == Geometry()
    assert [o.score for o in model.predict(splits.test)] == [o.score for o in loaded.predict(splits.test)]


@pytest.mark.parametrize(
    "geometry",
    [{"image_size": [96, 80]}, {"resize": 80, "center_crop": [64, 48]}, {"tile": 32}, {"tile": 32, "tile_stride": 16}, {"image_size": 96, "tile": 64, "tile_stride": 40}],
    ids=["image-size", "resize-crop", "tile", "tile-overlap", "image-size-tile-overlap"],
)
def test_onnx_export_matches_torch_for_every_geometry(registry, tmp_path, geometry, one_torch_thread):
    pytest.importorskip("onnxruntime")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx

    splits = make_tiny_splits()
    model = build_model(tiny_config(tmp_path, detectors=["report-distance"], threshold="report-max", **geometry), registry)
    model.fit(splits.train, splits.validation)
    model.save(tmp_path / "m", registry)
    loaded = AnomalyModel.load(tmp_path / "m", "cpu", registry)
    description = export_onnx(loaded, tmp_path / "m.onnx")
    assert description["input"]["shape"] == ["batch", 3, "height", "width"]  # any size, resized inside
    size = tuple(loaded.input_preprocessing(loaded.members[0]).resize or loaded.geometry.working_size)
    assert description["geometry"] == loaded.geometry.to_dict()
    assert any("tiling" in step for step in description["inside_graph"]) == ("tile" in geometry)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(3)] + [s.load_image() for s in splits.test[6:8]] * (size == (64, 64))
    assert check_parity(loaded, tmp_path / "m.onnx", images) < PARITY_TOLERANCE
    export_onnx(loaded, tmp_path / "other.onnx", input_size=(72, 100))  # pinned to another size: resized inside
    images = [rng.integers(0, 256, (72, 100, 3), dtype=np.uint8) for _ in range(2)]
    assert check_parity(loaded, tmp_path / "other.onnx", images) < PARITY_TOLERANCE


def test_a_score_ensemble_fuses_stitched_maps_of_tiled_members(registry, tmp_path, one_torch_thread):
    """Every member works on the same tiles, so their stitched maps share the working size; the
    ensemble is calibrated on stitched (image-level) predictions."""
    splits = make_tiny_splits()
    model = build_model(tiny_config(tmp_path, detectors=["feature-distance", "spy-images"], ensemble="score-mean", tile=32, tile_stride=16), registry)
    model.fit(splits.train, [])
    assert model.calibration["method"] == "cross-fit"
    outputs = list(model.predict(splits.test))
    assert all(o.map.shape == (64, 64) for o in outputs)
    scores = np.array([o.score for o in outputs])
    assert scores[6:].min() > scores[:6].max()  # the defective half ranks above the good half


# --------------------------------------------------------------------------- configuration and CLI


def test_bad_geometry_stops_the_run_before_anything_is_written(registry, tmp_path):
    with pytest.raises(VadError, match="--tile 16 is smaller than the deepest feature stride 32"):
        run(tiny_config(tmp_path, tile=16, aggregation=1, layers=["stage2", "stage4"]), registry)
    with pytest.raises(VadError, match="the 24 px network input is smaller than the deepest feature stride 32"):
        run(tiny_config(tmp_path, image_size=24, layers=["stage4"]), registry)
    with pytest.raises(VadError, match="larger than --resize"):
        run(tiny_config(tmp_path, resize=[64, 64], center_crop=[80, 80]), registry)
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(__import__("vad.cli", fromlist=["app"]).app, ["--quiet", "run", "--dataset", "tiny", "--tile", "64", "--tile-stride", "65", "--output", str(tmp_path / "cli")])
    assert isinstance(result.exception, VadError) and "would leave gaps" in str(result.exception)
    assert not (tmp_path / "cli").exists()


def test_a_saved_model_keeps_its_geometry_and_refuses_another(registry, tmp_path, one_torch_thread):
    first, _ = run(tiny_config(tmp_path, tile=32), registry)
    assert yaml.safe_load((first / "config.yaml").read_text())["tile"] == 32
    again, _ = run(tiny_config(tmp_path, output=str(tmp_path / "again"), model=str(first)), registry)  # saved geometry
    with open(first / "tiny-a" / "scores.csv") as a, open(again / "tiny-a" / "scores.csv") as b:
        assert a.read() == b.read()
    run(tiny_config(tmp_path, output=str(tmp_path / "same"), model=str(first), tile=32), registry)  # the same: fine
    with pytest.raises(VadError, match="fitted with the input geometry 'at 64x64; tiles of 32 px.*asks for 'resized: 96x96'"):
        run(tiny_config(tmp_path, output=str(tmp_path / "other"), model=str(first), image_size=96), registry)
    assert not (tmp_path / "other").exists()


def test_draem_gets_the_network_size_through_its_own_image_size_option(registry, tmp_path):
    pytest.importorskip("vad_draem")
    from vad.options import OptionError

    model = build_model(tiny_config(tmp_path, detectors=["draem"], backbones=[], image_size=96), registry)
    assert model.members[0].detector.options.image_size == 96
    assert model.members[0].detector.preprocessing.size == (96, 96)
    tiled = build_model(tiny_config(tmp_path, detectors=["draem"], backbones=[], image_size=256, tile=64), registry)
    assert tiled.members[0].detector.options.image_size == 64
    with pytest.raises(OptionError, match="image_size=100 is not allowed.*multiple of 32"):
        build_model(tiny_config(tmp_path, detectors=["draem"], backbones=[], image_size=100), registry)
    with pytest.raises(VadError, match="takes square inputs.*96x128 inputs"):
        build_model(tiny_config(tmp_path, detectors=["draem"], backbones=[], image_size=[96, 128]), registry)
    with pytest.raises(VadError, match="takes square inputs.*--keep-aspect"):
        build_model(tiny_config(tmp_path, detectors=["draem"], backbones=[], image_size=96, keep_aspect=True), registry)
    with pytest.raises(VadError, match="draem.image_size=128 conflicts"):
        build_model(tiny_config(tmp_path, detectors=["draem"], backbones=[], image_size=96, options={"draem": {"image_size": 128}}), registry)


# --------------------------------------------------------------------------- the demo data end to end


@pytest.mark.parametrize(
    "flags",
    [["--image-size", "320"], ["--resize", "256", "--center-crop", "224"], ["--tile", "128"]],
    ids=["image-size-320", "resize-256-crop-224", "tile-128"],
)
def test_demo_run_predict_export_with_geometry(tmp_path, flags):
    """``vad run`` with each geometry on the demo bricks (PatchCore on lite0; hold-out calibration
    and a small coreset keep it short), then ``vad predict`` and ``vad export`` (parity checked)."""
    for module in ("vad_datasets", "vad_timm", "vad_patchcore", "onnxruntime"):
        pytest.importorskip(module)
    from vad.cli import app

    runner = CliRunner()
    run_folder = tmp_path / "run"
    result = runner.invoke(app, [
        "--quiet", "run", "--category", "brick", "--device", "cpu", "--no-report", "--calibration", "hold-out",
        "--set", "patchcore.coreset_ratio=0.02", "--output", str(run_folder), *flags,
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    model = run_folder / "brick" / "model"
    geometry = json.loads((model / "model.json").read_text())["geometry"]
    expected = {"--image-size": ("image_size", [320, 320]), "--center-crop": ("center_crop", [224, 224]), "--tile": ("tile", 128)}
    for flag, (key, value) in expected.items():
        if flag in flags:
            assert geometry[key] == value
    with open(run_folder / "brick" / "scores.csv") as handle:
        rows = list(__import__("csv").DictReader(handle))
    defective = [r for r in rows if r["label"] == "1"][:2]
    result = runner.invoke(app, ["--quiet", "predict", "--model", str(model), *(r["path"] for r in defective)])
    assert result.exit_code == 0, (result.output, result.exception)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["score"] for r in records] == pytest.approx([float(r["score"]) for r in defective], rel=1e-5)
    result = runner.invoke(app, ["--quiet", "export", "--model", str(model), "--output", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, (result.output, result.exception)  # --check: onnxruntime within PARITY_TOLERANCE
    description = json.loads((tmp_path / "m.onnx.json").read_text())
    working = {"--image-size": [320, 320], "--center-crop": [256, 256], "--tile": [128, 128]}
    preprocessing = description["preprocessing"]  # the graph resizes any image to this size
    assert (preprocessing["resize"] or preprocessing["size"]) == next(size for flag, size in working.items() if flag in flags)
