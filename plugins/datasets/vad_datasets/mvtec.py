"""MVTec AD and the data sets that share its layout: MPDD, BTAD, multi-view folders; and
MVTec 3D-AD (RGB images only).

MVTec layout (``<root>/<category>/``)::

    train/good/000.png
    test/good/000.png
    test/<defect>/000.png
    ground_truth/<defect>/000_mask.png

Grayscale categories (grid, screw, zipper) become 3-channel through :func:`vad.images.read_rgb`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vad.contracts import DataSplits, Sample

from vad_datasets.base import FileDataset, index_by_stem, mask_loader, subfolders

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MPDD_CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
BTAD_CATEGORIES = ("01", "02", "03")
MVTEC3D_CATEGORIES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire")


class MVTecAD(FileDataset):
    """MVTec AD: 15 categories, ``train/good``, ``test/<defect>``, ``ground_truth/<defect>/*_mask.png``."""

    name = "mvtec"
    official_url = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
    expected_layout = """
<root>/<category>/train/good/000.png ...
<root>/<category>/test/good/000.png ...
<root>/<category>/test/<defect>/000.png ...
<root>/<category>/ground_truth/<defect>/000_mask.png ...   (same size as the image)
"""
    known_categories = MVTEC_CATEGORIES
    #: Folder name of normal images in train/ and test/.
    normal_name: ClassVar[str] = "good"
    #: Mask file name = image stem + this suffix (+ an image extension).
    mask_suffix: ClassVar[str] = "_mask"
    #: True when a category without a ``ground_truth`` folder simply has no masks.
    masks_optional: ClassVar[bool] = False

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """The first known category (``bottle``; MPDD's ``bracket_black``) with 10 training
        images, 2 good and 3 defective test images and their masks. None for the embedded demo,
        which builds its own data and needs no root (it inherits this method: its module stays
        untouched, since the demo cache's fingerprint hashes that module's source)."""
        from vad_datasets import examples
        from vad_datasets.demo import DemoDataset

        if issubclass(cls, DemoDataset):
            return None
        return str(examples.mvtec(folder, cls.known_categories[0], normal=cls.normal_name, suffix=cls.mask_suffix))

    def category_folder(self, category: str) -> Path:
        """``<root>/<category>``."""
        return self.root_path() / category

    def category_marker(self) -> str:
        """``train/<normal>``: what makes a folder one category."""
        return f"train/{self.normal_name}"

    def view_of(self, category: str) -> str | None:
        """The camera view a category stands for (multi-view data sets), else None."""
        return None

    def load(self, category: str) -> DataSplits:
        """Train / validation / test samples of ``category``."""
        self.check_category(category)
        folder = self.category_folder(category)
        view = self.view_of(category)
        train_dir = folder / "train" / self.normal_name
        train_paths = self.images(train_dir)
        self.require_train(train_paths, train_dir)
        train, validation = self.train_and_validation(train_paths, category, view)

        test_dir = folder / "test"
        if not test_dir.is_dir():
            raise self.layout_error(f"no test folder {test_dir}.")
        truth_dir = folder / "ground_truth"
        has_masks = truth_dir.is_dir() or not self.masks_optional
        test: list[Sample] = []
        for defect_dir in subfolders(test_dir):
            defect = defect_dir.name
            masks = index_by_stem(truth_dir / defect) if has_masks and defect != self.normal_name else {}
            for path in self.images(defect_dir):
                if defect == self.normal_name:
                    test.append(self.sample(path, label=0, category=category, split="test", view=view))
                    continue
                mask = None
                if has_masks:
                    mask_path = masks.get(path.stem + self.mask_suffix)
                    if mask_path is None:
                        raise self.layout_error(
                            f"defect image {path} has no mask: expected {truth_dir / defect / (path.stem + self.mask_suffix)}.png"
                        )
                    mask = mask_loader(mask_path, path)
                test.append(self.sample(path, label=1, category=category, split="test", defect_type=defect, mask=mask, view=view))
        if not test:
            raise self.layout_error(f"no test images under {test_dir}.")
        return DataSplits(category=category, train=train, validation=validation, test=test, has_masks=has_masks)


class MPDD(MVTecAD):
    """MPDD (Metal Parts Defect Detection): 6 categories in the MVTec AD layout."""

    name = "mpdd"
    official_url = "https://github.com/stepanje/MPDD"
    known_categories = MPDD_CATEGORIES


class BTAD(MVTecAD):
    """BTAD (beanTech): products 01-03, ``train/ok``, ``test/{ok,ko}``, ``ground_truth/ko``."""

    name = "btad"
    official_url = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
    expected_layout = """
<root>/<01|02|03>/train/ok/0000.bmp ...
<root>/<01|02|03>/test/ok/0000.bmp ...
<root>/<01|02|03>/test/ko/0000.bmp ...
<root>/<01|02|03>/ground_truth/ko/0000.png ...   (same name as the image, .png or .bmp)
"""
    known_categories = BTAD_CATEGORIES
    normal_name = "ok"
    mask_suffix = ""

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """Product ``01``: 10 ``train/ok`` images, 2 ``test/ok``, 3 ``test/ko`` (.bmp) with same-name masks."""
        from vad_datasets import examples

        return str(examples.mvtec(folder, "01", defects={"ko": 3}, ext=".bmp", normal=cls.normal_name, suffix=cls.mask_suffix))


class MultiView(MVTecAD):
    """Multi-camera data: each view is its own category (own model), each in the MVTec layout.

    ``<root>/<view>/train/good`` gives category ``<view>``; ``<root>/<product>/<view>/train/good``
    gives category ``<product>/<view>``. ``Sample.view`` is the view folder name. A view
    without a ``ground_truth`` folder has no masks (image-level metrics only).
    """

    name = "multi-view"
    official_url = ""
    expected_layout = """
<root>/<view>/train/good/*.png              -> category "<view>"
<root>/<product>/<view>/train/good/*.png    -> category "<product>/<view>"
each view: test/good, test/<defect>, optional ground_truth/<defect>/<name>_mask.png
"""
    masks_optional = True

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """Product ``flange`` with views ``front`` (masks) and ``side`` (no ground_truth folder)."""
        from vad_datasets import examples

        return str(examples.multi_view(folder))

    def categories(self) -> list[str]:
        """``<view>`` and ``<product>/<view>`` folders that hold the MVTec layout."""
        root = self.root_path()
        found: list[str] = []
        for folder in subfolders(root):
            if self.is_category(folder):
                found.append(folder.name)
            else:
                found.extend(f"{folder.name}/{view.name}" for view in subfolders(folder) if self.is_category(view))
        if not found:
            raise self.no_category_error(root, "view")
        return found

    def view_of(self, category: str) -> str | None:
        """The last path part of the category."""
        return category.rsplit("/", 1)[-1]


class MVTec3D(FileDataset):
    """MVTec 3D-AD, RGB images only: ``<split>/<defect>/rgb/*.png`` with masks in ``gt/``.

    The official ``validation/good`` folder is the validation split (``validation_fraction``
    applies only when it is missing). XYZ point clouds are ignored.
    """

    name = "mvtec-3d"
    official_url = "https://www.mvtec.com/company/research/datasets/mvtec-3d-ad"
    expected_layout = """
<root>/<category>/train/good/rgb/000.png ...
<root>/<category>/validation/good/rgb/000.png ...
<root>/<category>/test/<defect|good>/rgb/000.png ...
<root>/<category>/test/<defect|good>/gt/000.png ...   (same size as the image)
"""
    known_categories = MVTEC3D_CATEGORIES

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """``bagel``: 5 training and 2 validation images, a good and 3 ``crack`` test images with masks."""
        from vad_datasets import examples

        return str(examples.mvtec3d(folder))

    def category_marker(self) -> str:
        """``train/good/rgb``: what makes a folder one category."""
        return "train/good/rgb"

    def load(self, category: str) -> DataSplits:
        """Train / validation / test samples of ``category``."""
        self.check_category(category)
        folder = self.root_path() / category
        train_dir = folder / "train" / "good" / "rgb"
        train_paths = self.images(train_dir)
        self.require_train(train_paths, train_dir)
        validation_dir = folder / "validation" / "good" / "rgb"
        if validation_dir.is_dir():
            train = [self.sample(p, label=0, category=category, split="train") for p in train_paths]
            validation = [self.sample(p, label=0, category=category, split="validation") for p in self.images(validation_dir)]
        else:
            train, validation = self.train_and_validation(train_paths, category)
        test: list[Sample] = []
        for defect_dir in subfolders(folder / "test"):
            defect = defect_dir.name
            masks = index_by_stem(defect_dir / "gt")
            for path in self.images(defect_dir / "rgb"):
                if defect == "good":
                    test.append(self.sample(path, label=0, category=category, split="test"))
                    continue
                if path.stem not in masks:
                    raise self.layout_error(f"defect image {path} has no mask: expected {defect_dir / 'gt' / path.name}.")
                test.append(
                    self.sample(path, label=1, category=category, split="test", defect_type=defect, mask=mask_loader(masks[path.stem], path))
                )
        if not test:
            raise self.layout_error(f"no test images under {folder / 'test'}.")
        return DataSplits(category=category, train=train, validation=validation, test=test, has_masks=True)


__all__ = ["MVTecAD", "MPDD", "BTAD", "MultiView", "MVTec3D"]
