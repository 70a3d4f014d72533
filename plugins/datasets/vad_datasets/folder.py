"""Your own data: a folder of normal images, one or more folders of defective ones, optional masks.

Options (paths are relative to ``root`` unless absolute)::

    normal_dir        "good"          normal images (train, validation and, unless
                                      normal_test_dir is given, some test normals)
    abnormal_dirs     []              one folder per defect type (a string or a list)
    mask_dirs         None            mask folder(s): one for all, or one per abnormal dir
    mask_pattern      "{stem}_mask.png"   mask file name from the image's {stem}, {name}, {ext}
    normal_test_dir   None            normal test images; else test_fraction of normal_dir
    test_fraction     0.2             share of normal_dir used as test normals (no normal_test_dir)
    extensions        None            e.g. [".png", ".jpg"]; default every image type
    category          None            the category name (default: the root folder's name)

Without ``mask_dirs`` the data set has no pixel ground truth (image metrics only); with them,
every abnormal image must have its mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vad.contracts import DataSplits, Sample
from vad.errors import VadError
from vad.images import IMAGE_EXTENSIONS

from vad_datasets.base import FileDataset, mask_loader, split_validation


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


class FolderDataset(FileDataset):
    """A user's own folders: normal dir, abnormal dirs, optional mask dirs with a name pattern."""

    name = "folder"
    expected_layout = """
<root>/good/*.png                    normal images (--option normal_dir=...)
<root>/<defect>/*.png                abnormal images, one folder per defect type (abnormal_dirs)
<root>/<masks>/<stem>_mask.png       optional masks (mask_dirs, mask_pattern)
"""
    extra_options = {
        "normal_dir": "good",
        "abnormal_dirs": [],
        "mask_dirs": None,
        "mask_pattern": "{stem}_mask.png",
        "normal_test_dir": None,
        "test_fraction": 0.2,
        "extensions": None,
        "category": None,
    }

    def __init__(self, root: str | None = None, **options: Any) -> None:
        super().__init__(root, **options)
        o = self.options
        self.abnormal_dirs = _as_list(o["abnormal_dirs"])
        self.mask_dirs = _as_list(o["mask_dirs"])
        if self.mask_dirs and len(self.mask_dirs) not in (1, len(self.abnormal_dirs)):
            raise VadError(
                f"folder: give one mask_dirs entry for all abnormal dirs or one per abnormal dir "
                f"({len(self.abnormal_dirs)}), got {len(self.mask_dirs)}"
            )
        if not 0 <= float(o["test_fraction"]) < 1:
            raise VadError(f"folder: test_fraction must be in [0, 1), got {o['test_fraction']!r}")
        try:
            o["mask_pattern"].format(stem="x", name="x.png", ext=".png")
        except (KeyError, IndexError, AttributeError) as error:
            raise VadError(
                f"folder: mask_pattern {o['mask_pattern']!r} may only use {{stem}}, {{name}} and {{ext}} ({error})"
            ) from error
        self.extensions = tuple(_as_list(o["extensions"])) or IMAGE_EXTENSIONS

    def _dir(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root_path() / path

    def categories(self) -> list[str]:
        """One category: ``category`` or the root folder's name."""
        return [self.options["category"] or self.root_path().resolve().name]

    def load(self, category: str) -> DataSplits:
        """Normals split into train / validation / test normals; abnormal dirs into test."""
        self.check_category(category)
        normal_dir = self._dir(self.options["normal_dir"])
        if not normal_dir.is_dir():
            raise self.layout_error(f"normal_dir {normal_dir} does not exist.")
        normals = self.images(normal_dir, self.extensions)
        test: list[Sample] = []
        if self.options["normal_test_dir"]:
            test_dir = self._dir(self.options["normal_test_dir"])
            if not test_dir.is_dir():
                raise self.layout_error(f"normal_test_dir {test_dir} does not exist.")
            test_normals = self.images(test_dir, self.extensions)
        else:
            normals, test_normals = split_validation(normals, float(self.options["test_fraction"]), self.seed + 1)
        self.require_train(normals, normal_dir)
        train, validation = self.train_and_validation(normals, category)
        test.extend(self.sample(p, label=0, category=category, split="test") for p in test_normals)

        for index, abnormal in enumerate(self.abnormal_dirs):
            abnormal_dir = self._dir(abnormal)
            if not abnormal_dir.is_dir():
                raise self.layout_error(f"abnormal dir {abnormal_dir} does not exist.")
            mask_dir = None
            if self.mask_dirs:
                mask_dir = self._dir(self.mask_dirs[index if len(self.mask_dirs) > 1 else 0])
                if not mask_dir.is_dir():
                    raise self.layout_error(f"mask dir {mask_dir} does not exist.")
            for path in self.images(abnormal_dir, self.extensions):
                mask = None
                if mask_dir is not None:
                    mask_path = mask_dir / self.options["mask_pattern"].format(stem=path.stem, name=path.name, ext=path.suffix)
                    if not mask_path.is_file():
                        raise self.layout_error(
                            f"defect image {path} has no mask: expected {mask_path} (mask_pattern {self.options['mask_pattern']!r})."
                        )
                    mask = mask_loader(mask_path, path)
                test.append(self.sample(path, label=1, category=category, split="test", defect_type=abnormal_dir.name, mask=mask))
        return DataSplits(category=category, train=train, validation=validation, test=test, has_masks=bool(self.mask_dirs))
