"""Your own data: a folder of normal images, one or more folders of defective ones, optional masks.

The options (:class:`FolderDataset.Options`; ``vad list datasets --details``) name the folders,
relative to ``root`` unless absolute: ``normal_dir`` (train, validation and, unless
``normal_test_dir`` is given, ``test_fraction`` of the test normals), ``abnormal_dirs`` (one per
defect type), ``mask_dirs`` with the ``mask_pattern`` that names a mask after its image.

Without ``mask_dirs`` the data set has no pixel ground truth (image metrics only); with them,
every abnormal image must have its mask.
"""

from __future__ import annotations

from pathlib import Path

from vad.contracts import DataSplits, Sample
from vad.images import IMAGE_EXTENSIONS
from vad.options import option

from vad_datasets.base import FileDataset, found_instead, mask_loader, split_validation


def _as_list(value: str | tuple[str, ...] | None) -> list[str]:
    """One folder name, several, or none, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _is_mask_pattern(pattern: str) -> bool:
    """True when ``pattern`` formats with only ``{stem}``, ``{name}`` and ``{ext}``."""
    try:
        pattern.format(stem="x", name="x.png", ext=".png")
    except (KeyError, IndexError, ValueError):
        return False
    return True


class FolderDataset(FileDataset):
    """A user's own folders: normal dir, abnormal dirs, optional mask dirs with a name pattern."""

    name = "folder"
    expected_layout = """
<root>/good/*.png                    normal images (--option normal_dir=...)
<root>/<defect>/*.png                abnormal images, one folder per defect type (abnormal_dirs)
<root>/<masks>/<stem>_mask.png       optional masks (mask_dirs, mask_pattern)
"""
    #: The tiny layout's defect folder and masks (the other options keep their defaults).
    tiny_options = {"abnormal_dirs": ["dent"], "mask_dirs": "masks"}

    class Options(FileDataset.Options):
        normal_dir: str = option("good", "Folder of normal images: train, validation and (without normal_test_dir) test normals.")
        abnormal_dirs: str | list[str] = option([], "Folder(s) of defective images, one per defect type (named after the folder).")
        mask_dirs: str | list[str] | None = option(None, "Mask folder(s), one for all abnormal dirs or one per abnormal dir; none: no pixel masks.")
        mask_pattern: str = option(
            "{stem}_mask.png",
            "Mask file name made from the image's {stem}, {name} and {ext}.",
            rule=(_is_mask_pattern, "a file name pattern using only {stem}, {name} and {ext}"),
        )
        normal_test_dir: str | None = option(None, "Folder of normal test images; none: test_fraction of normal_dir become test normals.")
        test_fraction: float = option(0.2, "Share of normal_dir used as test normals when normal_test_dir is not given.", ge=0, lt=1)
        extensions: str | list[str] | None = option(None, "Image extensions to read, e.g. ['.png', '.jpg']; none: every image type.")
        category: str | None = option(None, "The category name; none: the root folder's name.")

        def check(self) -> None:
            abnormal, masks = _as_list(self.abnormal_dirs), _as_list(self.mask_dirs)
            if masks and len(masks) not in (1, len(abnormal)):
                raise self.invalid("mask_dirs", f"one folder for all abnormal dirs or one per abnormal dir ({len(abnormal)})")

    @classmethod
    def tiny_layout(cls, folder: Path) -> str | None:
        """Category ``parts``: 10 images in ``good/``, 2 in ``dent/`` and their masks in ``masks/``."""
        from vad_datasets import examples

        return str(examples.folder(folder / "parts"))

    def _existing_dir(self, option_name: str, value: str) -> Path:
        """The folder an option names (relative to the root unless absolute); a missing one is
        an error saying what the nearest existing folder holds instead."""
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.root_path() / path
        if not path.is_dir():
            raise self.layout_error(f"{option_name} {path} does not exist {found_instead(path)}.")
        return path

    def categories(self) -> list[str]:
        """One category: ``category`` or the root folder's name."""
        return [self.options.category or self.root_path().resolve().name]

    def load(self, category: str) -> DataSplits:
        """Normals split into train / validation / test normals; abnormal dirs into test."""
        self.check_category(category)
        options = self.options
        extensions = tuple(_as_list(options.extensions)) or IMAGE_EXTENSIONS
        mask_dirs = _as_list(options.mask_dirs)
        normal_dir = self._existing_dir("normal_dir", options.normal_dir)
        normals = self.images(normal_dir, extensions)
        test: list[Sample] = []
        if options.normal_test_dir:
            test_dir = self._existing_dir("normal_test_dir", options.normal_test_dir)
            test_normals = self.images(test_dir, extensions)
        else:
            normals, test_normals = split_validation(normals, options.test_fraction, options.seed + 1)
        self.require_train(normals, normal_dir)
        train, validation = self.train_and_validation(normals, category)
        test.extend(self.sample(p, label=0, category=category, split="test") for p in test_normals)

        for index, abnormal in enumerate(_as_list(options.abnormal_dirs)):
            abnormal_dir = self._existing_dir("abnormal dir", abnormal)
            mask_dir = None
            if mask_dirs:
                mask_dir = self._existing_dir("mask dir", mask_dirs[index if len(mask_dirs) > 1 else 0])
            for path in self.images(abnormal_dir, extensions):
                mask = None
                if mask_dir is not None:
                    mask_path = mask_dir / options.mask_pattern.format(stem=path.stem, name=path.name, ext=path.suffix)
                    if not mask_path.is_file():
                        raise self.layout_error(
                            f"defect image {path} has no mask: expected {mask_path} (mask_pattern {options.mask_pattern!r})."
                        )
                    mask = mask_loader(mask_path, path)
                test.append(self.sample(path, label=1, category=category, split="test", defect_type=abnormal_dir.name, mask=mask))
        return DataSplits(category=category, train=train, validation=validation, test=test, has_masks=bool(mask_dirs))
