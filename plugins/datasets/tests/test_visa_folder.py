"""VisA (split CSV) and the user's own folders."""

from __future__ import annotations

import pytest

from vad.errors import VadError
from vad.options import OptionError
from vad_datasets.base import LayoutError, UnknownCategoryError
from vad_datasets.folder import FolderDataset
from vad_datasets.visa import VisA


def test_visa_split_csv(tmp_path, trees):
    trees.visa(tmp_path)
    dataset = VisA(root=str(tmp_path), validation_fraction=0.2)
    assert dataset.categories() == ["candle"]
    splits = dataset.load("candle")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (4, 1, 4)
    bad = [s for s in splits.test if s.label]
    assert len(bad) == 2 and bad[1].load_mask().sum() == 6 * 7  # label value 2 counts as defect
    assert splits.train[0].load_image().shape == (*trees.SIZE, 3)
    with pytest.raises(UnknownCategoryError, match="Did you mean 'candle'"):
        dataset.load("candel")


def test_visa_split_file_option(tmp_path, trees):
    trees.visa(tmp_path)
    (tmp_path / "split_csv" / "1cls.csv").rename(tmp_path / "mine.csv")
    dataset = VisA(root=str(tmp_path), split_file="mine.csv")
    assert dataset.options.split_file == "mine.csv" and dataset.categories() == ["candle"]
    assert VisA().options.split_file == "split_csv/1cls.csv"
    with pytest.raises(VadError, match=r"data set 'visa' has no option 'splitfile' \(did you mean 'split_file'\?\)"):
        VisA(root=str(tmp_path), splitfile="mine.csv")


def test_visa_missing_split_file_and_mask(tmp_path, trees):
    with pytest.raises(LayoutError, match="1cls.csv is missing") as error:
        VisA(root=str(tmp_path)).categories()
    assert "spot-diff" in str(error.value)
    trees.visa(tmp_path)
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(LayoutError, match="001.JPG has no mask"):
        VisA(root=str(tmp_path)).load("candle")


def _folder_tree(root, trees):
    for i in range(10):
        trees.write_image(root / "ok" / f"{i}.png")
    trees.write_image(root / "ok" / "notes.jpg")
    for defect in ("dent", "burr"):
        for i in range(2):
            trees.write_image(root / defect / f"{defect}{i}.png", value=250)
            trees.write_mask(root / "masks" / f"{defect}{i}.gt.png")
    return root


def test_folder_with_masks_pattern_and_extension_filter(tmp_path, trees):
    _folder_tree(tmp_path / "parts", trees)
    dataset = FolderDataset(
        root=str(tmp_path / "parts"),
        normal_dir="ok",
        abnormal_dirs=["dent", "burr"],
        mask_dirs="masks",
        mask_pattern="{stem}.gt.png",
        extensions=[".png"],
        test_fraction=0.2,
        validation_fraction=0.25,
    )
    assert dataset.categories() == ["parts"]
    assert dataset.options.abnormal_dirs == ("dent", "burr") and dataset.hparams["abnormal_dirs"] == ["dent", "burr"]
    assert FolderDataset(root=str(tmp_path / "parts"), **dataset.hparams).options == dataset.options
    splits = dataset.load("parts")
    assert (len(splits.train), len(splits.validation)) == (6, 2)
    assert sum(1 for s in splits.test if s.label == 0) == 2
    assert sorted({s.defect_type for s in splits.test if s.label}) == ["burr", "dent"]
    assert splits.has_masks and all(s.load_mask().sum() == 42 for s in splits.test if s.label)
    assert not any(s.path.endswith(".jpg") for s in splits.train + splits.validation + splits.test)


def test_folder_without_masks_and_with_normal_test_dir(tmp_path, trees):
    root = _folder_tree(tmp_path / "parts", trees)
    for i in range(3):
        trees.write_image(root / "ok_test" / f"{i}.png")
    splits = FolderDataset(root=str(root), normal_dir="ok", abnormal_dirs="dent", normal_test_dir="ok_test", validation_fraction=0).load("parts")
    assert len(splits.train) == 11 and sum(1 for s in splits.test if s.label == 0) == 3
    assert not splits.has_masks and all(s.mask_loader is None for s in splits.test)


def test_folder_errors(tmp_path, trees):
    root = _folder_tree(tmp_path / "parts", trees)
    with pytest.raises(LayoutError, match="has no mask: expected .*dent0_mask.png"):
        FolderDataset(root=str(root), normal_dir="ok", abnormal_dirs=["dent"], mask_dirs="masks").load("parts")
    with pytest.raises(LayoutError, match="normal_dir .*good does not exist"):
        FolderDataset(root=str(root)).load("parts")
    (root / "empty").mkdir()
    with pytest.raises(LayoutError, match="no training images"):
        FolderDataset(root=str(root), normal_dir="empty").load("parts")
    with pytest.raises(OptionError, match=r"data set 'folder': option mask_dirs=\('a', 'b'\) is not allowed; mask_dirs must be one folder for all abnormal dirs or one per abnormal dir \(3\)"):
        FolderDataset(root=str(root), abnormal_dirs=["dent", "burr", "x"], mask_dirs=["a", "b"])
    with pytest.raises(OptionError, match=r"option mask_pattern='\{image\}_mask.png' is not allowed; mask_pattern must be a string, a file name pattern using only \{stem\}, \{name\} and \{ext\}"):
        FolderDataset(root=str(root), mask_pattern="{image}_mask.png")
    with pytest.raises(OptionError, match=r"option test_fraction=1.0 is not allowed; test_fraction must be a number, >= 0 and < 1"):
        FolderDataset(root=str(root), test_fraction=1.0)
    with pytest.raises(OptionError, match=r"option abnormal_dirs=\[1, 2\] is not allowed; abnormal_dirs must be a string or a list of strings"):
        FolderDataset(root=str(root), abnormal_dirs=[1, 2])
    with pytest.raises(VadError, match=r"data set 'folder' has no option 'mask_dir' \(did you mean 'mask_dirs'\?\)"):
        FolderDataset(root=str(root), mask_dir="masks")
    with pytest.raises(LayoutError, match="abnormal dir .*nope does not exist"):
        FolderDataset(root=str(root), normal_dir="ok", abnormal_dirs=["nope"]).load("parts")


def test_visa_category_with_the_wrong_inside_says_what_is_missing(tmp_path, trees):
    trees.visa(tmp_path)
    (tmp_path / "candle" / "Data" / "Images").rename(tmp_path / "candle" / "Images")  # Data/ level left out
    with pytest.raises(LayoutError, match=r"category folder .*candle has no Data/Images/Normal/ \(found in .*candle/Data: Masks/\); the split file names .*Normal/0000.JPG"):
        VisA(root=str(tmp_path)).load("candle")
    (tmp_path / "candle" / "Images").rename(tmp_path / "candle" / "Data" / "Images")
    next((tmp_path / "candle" / "Data" / "Images" / "Normal").iterdir()).unlink()  # a single file missing keeps its message
    with pytest.raises(LayoutError, match="is named in the split file but missing"):
        VisA(root=str(tmp_path)).load("candle")


def test_folder_missing_dirs_say_what_the_root_holds(tmp_path, trees):
    root = _folder_tree(tmp_path / "parts", trees)
    with pytest.raises(LayoutError, match=r"normal_dir .*parts/good does not exist \(found in .*parts: burr/, dent/, masks/, ok/\)"):
        FolderDataset(root=str(root)).load("parts")
    with pytest.raises(LayoutError, match=r"mask dir .*parts/gt does not exist \(found in .*parts: burr/"):
        FolderDataset(root=str(root), normal_dir="ok", abnormal_dirs=["dent"], mask_dirs="gt").load("parts")
