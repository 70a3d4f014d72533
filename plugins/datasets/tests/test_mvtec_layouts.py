"""MVTec AD, MPDD, BTAD, MVTec 3D-AD and multi-view: counts, labels, masks and every error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vad.errors import VadError
from vad.images import BadImageError
from vad.options import OptionError
from vad_datasets.base import LayoutError, MaskSizeError, UnknownCategoryError, split_validation
from vad_datasets.mvtec import BTAD, MPDD, MultiView, MVTec3D, MVTecAD


def test_mvtec_counts_labels_and_masks(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", train=10, good=2, defects={"broken": 2, "crack": 1})
    trees.mvtec(tmp_path, "screw", train=3, good=1, defects={"scratch_head": 1})
    (tmp_path / "not_a_category").mkdir()
    dataset = MVTecAD(root=str(tmp_path), validation_fraction=0.2)
    assert dataset.categories() == ["bottle", "screw"]
    splits = dataset.load("bottle")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (8, 2, 5)
    assert len(MVTecAD(root=str(tmp_path)).load("bottle").validation) == 0  # by default every image trains
    assert splits.has_masks
    assert all(s.label == 0 and s.split == "train" for s in splits.train)
    assert splits.validation[0].split == "validation"
    labels = {(s.defect_type, s.label) for s in splits.test}
    assert labels == {("good", 0), ("broken", 1), ("crack", 1)}
    broken = [s for s in splits.test if s.defect_type == "broken"]
    mask = broken[1].load_mask()
    assert mask.dtype == bool and mask.shape == trees.SIZE and mask.sum() == 5 * 5
    assert all(s.load_mask() is None for s in splits.test if s.label == 0)
    image = splits.train[0].load_image()
    assert image.shape == (*trees.SIZE, 3) and image.dtype == np.uint8
    assert splits.train[0].path.endswith("train/good/000.png") or splits.validation[0].path.endswith("000.png")


def test_validation_split_is_deterministic_and_seeded():
    items = list(range(50))
    first = split_validation(items, 0.1, seed=0)
    assert first == split_validation(items, 0.1, seed=0)
    assert len(first[1]) == 5 and sorted(first[0] + first[1]) == items
    assert split_validation(items, 0.1, seed=1)[1] != first[1]
    assert split_validation([1], 0.5, seed=0) == ([1], [])  # never every training image
    assert split_validation(items, 0.0, seed=0) == (items, [])


def test_grayscale_16bit_rgba_palette_images_load_as_rgb(tmp_path, trees):
    trees.mvtec(tmp_path, "grid", train=2, good=1, defects={})
    train = tmp_path / "grid" / "train" / "good"
    gray = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32)
    Image.fromarray(gray).save(train / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(train / "deep.png")
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(train / "rgba.png")
    palette = Image.fromarray(np.full((24, 32, 3), (10, 120, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE, colors=4)
    palette.save(train / "palette.png")
    dataset = MVTecAD(root=str(tmp_path), validation_fraction=0)
    by_name = {s.path.rsplit("/", 1)[-1]: s.load_image() for s in dataset.load("grid").train}
    for image in by_name.values():
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert (by_name["gray.png"][..., 0] == gray).all() and (by_name["gray.png"][..., 2] == gray).all()
    assert np.abs(by_name["deep.png"][..., 1].astype(int) - gray).max() <= 1  # 16 bits scaled, not clipped
    assert (by_name["rgba.png"][0, 0] == (200, 0, 0)).all()
    assert (by_name["palette.png"][0, 0] == (10, 120, 30)).all()


def test_unknown_category_suggests_nearest(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle")
    dataset = MVTecAD(root=str(tmp_path))
    with pytest.raises(UnknownCategoryError, match="Did you mean 'bottle'"):
        dataset.load("botle")
    with pytest.raises(LayoutError, match="'cable' is not under"):  # official name, not present
        dataset.load("cable")


def test_wrong_root_shows_layout_and_source(tmp_path, trees):
    with pytest.raises(LayoutError, match="needs --root") as error:
        MVTecAD().categories()
    assert "ground_truth/<defect>/000_mask.png" in str(error.value) and "mvtec.com" in str(error.value)
    with pytest.raises(LayoutError, match="does not exist"):
        MVTecAD(root=str(tmp_path / "missing")).categories()
    with pytest.raises(LayoutError, match="no category folder"):
        MVTecAD(root=str(tmp_path)).categories()
    trees.mvtec(tmp_path, "bottle")
    with pytest.raises(LayoutError, match="itself looks like one category"):
        MVTecAD(root=str(tmp_path / "bottle")).categories()


def test_empty_train_folder(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", train=0)
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True, exist_ok=True)
    with pytest.raises(LayoutError, match="no training images"):
        MVTecAD(root=str(tmp_path)).load("bottle")


def test_defect_image_without_mask(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle")
    (tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(LayoutError, match=r"has no mask: expected .*crack/000_mask\.png"):
        MVTecAD(root=str(tmp_path)).load("bottle")


def test_mask_size_must_match_image(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", defects={"crack": 1})
    trees.write_mask(tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=(16, 16))
    sample = [s for s in MVTecAD(root=str(tmp_path)).load("bottle").test if s.label][0]
    with pytest.raises(MaskSizeError, match="000_mask.png is 16x16"):
        sample.load_mask()


def test_corrupt_image_stops_or_is_skipped(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", train=4)
    bad = tmp_path / "bottle" / "train" / "good" / "002.png"
    bad.write_bytes(b"this is not a png")
    (tmp_path / "bottle" / "train" / "good" / "003.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="002.png"):
        MVTecAD(root=str(tmp_path)).load("bottle")
    dataset = MVTecAD(root=str(tmp_path), skip_bad=True, validation_fraction=0)
    splits = dataset.load("bottle")
    assert len(splits.train) == 2
    assert [p.rsplit("/", 1)[-1] for p, _ in dataset.skipped] == ["002.png", "003.png"]


def test_truncated_image_fails_at_decode_naming_the_file(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", train=2)
    path = tmp_path / "bottle" / "train" / "good" / "000.png"
    path.write_bytes(path.read_bytes()[:60])  # header intact, pixels cut
    sample = next(s for s in MVTecAD(root=str(tmp_path), validation_fraction=0).load("bottle").train if s.path == str(path))
    with pytest.raises(BadImageError, match="000.png"):
        sample.load_image()


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(VadError, match=r"data set 'mvtec' has no option 'color'; its options are: validation_fraction, seed, skip_bad"):
        MVTecAD(root=str(tmp_path), color=True)
    with pytest.raises(VadError, match=r"has no option 'valdation_fraction' \(did you mean 'validation_fraction'\?\)"):
        MVTecAD(root=str(tmp_path), valdation_fraction=0.3)
    with pytest.raises(OptionError, match=r"data set 'mvtec': option validation_fraction=1.5 is not allowed; validation_fraction must be a number, >= 0 and < 1"):
        MVTecAD(root=str(tmp_path), validation_fraction=1.5)
    with pytest.raises(OptionError, match=r"option skip_bad='maybe' is not allowed; skip_bad must be true or false"):
        MVTecAD(root=str(tmp_path), skip_bad="maybe")


def test_options_are_declared_coerced_and_rebuild_the_data_set(tmp_path):
    dataset = MVTecAD(root=str(tmp_path), validation_fraction="0.25", seed="3", skip_bad="true")
    assert dataset.options.validation_fraction == 0.25 and dataset.options.seed == 3 and dataset.options.skip_bad is True
    assert dataset.hparams == {"validation_fraction": 0.25, "seed": 3, "skip_bad": True}
    assert MVTecAD(root=str(tmp_path), **dataset.hparams).options == dataset.options
    assert MVTecAD().options.validation_fraction == 0.0  # the contract's default: every image trains


def test_mpdd_uses_the_mvtec_layout(tmp_path, trees):
    trees.mvtec(tmp_path, "tubes", train=4, defects={"anomalous": 2})
    splits = MPDD(root=str(tmp_path)).load("tubes")
    assert sum(s.label for s in splits.test) == 2
    with pytest.raises(UnknownCategoryError, match="Did you mean 'tubes'"):
        MPDD(root=str(tmp_path)).load("tube")


def test_btad_ok_ko_layout_with_same_name_masks(tmp_path, trees):
    trees.mvtec(tmp_path, "01", train=5, good=2, defects={"ko": 3}, ext=".bmp", normal="ok", suffix="")
    splits = BTAD(root=str(tmp_path)).load("01")
    assert (len(splits.train) + len(splits.validation), len(splits.test)) == (5, 5)
    bad = [s for s in splits.test if s.label]
    assert {s.defect_type for s in bad} == {"ko"} and bad[0].load_mask().sum() == 4 * 5


def test_mvtec3d_rgb_with_official_validation(tmp_path, trees):
    trees.mvtec3d(tmp_path)
    splits = MVTec3D(root=str(tmp_path), validation_fraction=0.5).load("bagel")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (5, 2, 4)
    assert all("/rgb/" in s.path for s in splits.test)
    crack = [s for s in splits.test if s.label]
    assert len(crack) == 3 and crack[0].load_mask().sum() == 6 * 7
    (tmp_path / "bagel" / "test" / "crack" / "gt" / "001.png").unlink()
    with pytest.raises(LayoutError, match="001.png has no mask"):
        MVTec3D(root=str(tmp_path)).load("bagel")


def test_multi_view_categories_and_views(tmp_path, trees):
    trees.mvtec(tmp_path / "flange", "top", train=3)
    trees.mvtec(tmp_path / "flange", "side", train=3, masks=False)
    trees.mvtec(tmp_path, "front", train=3)
    dataset = MultiView(root=str(tmp_path))
    assert dataset.categories() == ["flange/side", "flange/top", "front"]
    top = dataset.load("flange/top")
    assert top.category == "flange/top" and top.has_masks
    assert {s.view for s in top.train + top.validation + top.test} == {"top"}
    side = dataset.load("flange/side")
    assert not side.has_masks and all(s.mask_loader is None for s in side.test)
    with pytest.raises(UnknownCategoryError, match="Did you mean 'flange/top'"):
        dataset.load("flange/tpo")


def test_a_category_folder_with_the_wrong_inside_says_what_is_missing(tmp_path, trees):
    for folder in ("good", "bad"):  # <root>/fabric/{good,bad} instead of train/good, test/...
        trees.write_image(tmp_path / "fabric" / folder / "000.png")
    with pytest.raises(LayoutError, match=r"category folder .*fabric has no train/good/ \(found in .*fabric: bad/, good/\)") as error:
        MVTecAD(root=str(tmp_path)).load("fabric")
    assert "Expected layout for --dataset mvtec" in str(error.value)
    with pytest.raises(LayoutError, match=r"no category folder found under .*: a category folder holds train/good/, but .*fabric has no train/good/ \(found"):
        MVTecAD(root=str(tmp_path)).categories()
    trees.mvtec(tmp_path, "bottle")  # beside a good category: still what fabric lacks, not "unknown category"
    with pytest.raises(LayoutError, match=r"category folder .*fabric has no train/good/ \(found in .*fabric: bad/, good/\)"):
        MVTecAD(root=str(tmp_path)).load("fabric")
    (tmp_path / "carpet" / "train" / "normal").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"carpet has no train/good/ \(found in .*carpet/train: normal/\)"):
        MVTecAD(root=str(tmp_path)).load("carpet")


def test_btad_mvtec3d_and_multi_view_categories_with_the_wrong_inside(tmp_path, trees):
    trees.mvtec(tmp_path / "btad", "01", normal="ok")
    (tmp_path / "btad" / "01" / "train" / "ok").rename(tmp_path / "btad" / "01" / "train" / "good")
    with pytest.raises(LayoutError, match=r"category folder .*01 has no train/ok/ \(found in .*01/train: good/\)"):
        BTAD(root=str(tmp_path / "btad")).load("01")
    trees.mvtec3d(tmp_path / "3d")
    for image in (tmp_path / "3d" / "bagel" / "train" / "good" / "rgb").iterdir():
        image.rename(tmp_path / "3d" / "bagel" / "train" / "good" / image.name)
    (tmp_path / "3d" / "bagel" / "train" / "good" / "rgb").rmdir()
    with pytest.raises(LayoutError, match=r"category folder .*bagel has no train/good/rgb/ \(found in .*bagel/train/good: 5 files\)"):
        MVTec3D(root=str(tmp_path / "3d")).load("bagel")
    trees.mvtec(tmp_path / "views" / "flange", "top")
    trees.mvtec(tmp_path / "views" / "flange", "side")
    (tmp_path / "views" / "flange" / "side" / "train").rename(tmp_path / "views" / "flange" / "side" / "training")
    with pytest.raises(LayoutError, match=r"category folder .*flange/side has no train/good/ \(found in .*side: ground_truth/, test/, training/\)"):
        MultiView(root=str(tmp_path / "views")).load("flange/side")
    with pytest.raises(UnknownCategoryError, match="Did you mean 'flange/top'"):  # a product folder holds its views
        MultiView(root=str(tmp_path / "views")).load("flange")
