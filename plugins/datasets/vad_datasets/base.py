"""What every file-based data set shares: options, file listing, header checks, the
validation split, lazy loaders, and the error messages a user can act on.

Loaders are :func:`functools.partial` objects over module-level functions (not lambdas), so
samples stay picklable for multi-process data loading.
"""

from __future__ import annotations

import difflib
import functools
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from vad.contracts import DataSplits, Dataset, Region, Sample
from vad.errors import VadError
from vad.images import IMAGE_EXTENSIONS, BadImageError, image_size, read_mask, read_rgb

#: Image extensions used when looking for a mask next to an image name.
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


class LayoutError(VadError):
    """A data set folder that does not have the expected layout."""


class UnknownCategoryError(VadError):
    """A category name that is not in the data set."""


class MaskSizeError(VadError):
    """A ground-truth mask whose size differs from its image."""


# ------------------------------------------------------------------------ loaders


def load_checked_mask(mask_path: str, image_path: str):
    """Bool mask of ``mask_path``; raises :class:`MaskSizeError` if it is not the image's size."""
    mask = read_mask(mask_path)
    expected = image_size(image_path)
    if mask.shape != expected:
        raise MaskSizeError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
            f"{expected[1]}x{expected[0]}: masks must have the image's original resolution"
        )
    return mask


def load_union_mask(mask_paths: Sequence[str], image_path: str):
    """Union of several annotation masks of one image (MVTec LOCO), each size-checked."""
    import numpy as np

    union = np.zeros(image_size(image_path), dtype=bool)
    for mask_path in mask_paths:
        union |= load_checked_mask(mask_path, image_path)
    return union


def image_loader(path: str | Path):
    """Lazy RGB loader for ``path`` (decoded by :func:`vad.images.read_rgb` when called)."""
    return functools.partial(read_rgb, str(path))


def mask_loader(mask_path: str | Path, image_path: str | Path):
    """Lazy, size-checked mask loader."""
    return functools.partial(load_checked_mask, str(mask_path), str(image_path))


# ------------------------------------------------------------------------ helpers


def list_images(folder: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files directly in ``folder`` (case-insensitive extensions, hidden files ignored), sorted."""
    allowed = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in allowed)


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def found_instead(path: Path) -> str:
    """What the nearest existing folder on the way to the missing ``path`` holds, for messages:
    ``(found in /data/fabric: bad/, good/)``."""
    folder = path.parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as error:  # e.g. not readable
        return f"({folder} cannot be listed: {error.strerror})"
    if not entries:
        return f"({folder} is empty)"
    folders = [f"{p.name}/" for p in entries if p.is_dir()]
    shown = folders[:8] + ([f"{len(folders) - 8} more folders"] if len(folders) > 8 else [])
    files = len(entries) - len(folders)
    if files:
        shown.append(f"{files} file{'s' if files > 1 else ''}")
    return f"(found in {folder}: {', '.join(shown)})"


def lacks(folder: Path, missing: str) -> str:
    """``<folder> has no <missing>/ (found in ...)``: what a folder lacks and what it holds instead."""
    return f"{folder} has no {missing}/ {found_instead(folder / missing)}"


def index_by_stem(folder: Path) -> dict[str, Path]:
    """``{file name without extension: path}`` for the mask-like files in ``folder``."""
    return {p.stem: p for p in list_images(folder, MASK_EXTENSIONS)}


def split_validation(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministically hold out ``fraction`` of ``items`` (at least one when the fraction is
    positive and two or more items exist; never all of them). Order is kept in both parts."""
    n = len(items)
    count = int(round(n * fraction))
    if fraction > 0 and count == 0 and n >= 2:
        count = 1
    count = min(count, max(n - 1, 0))
    chosen = set(random.Random(seed).sample(range(n), count))
    kept = [item for i, item in enumerate(items) if i not in chosen]
    held_out = [item for i, item in enumerate(items) if i in chosen]
    return kept, held_out


# ------------------------------------------------------------------------ base class


class FileDataset(Dataset):
    """Base of the data sets read from a folder in an official layout.

    Options shared by every data set are declared on :class:`vad.contracts.Dataset`:

    * ``validation_fraction``: share of normal training images held out as the ``validation``
      split (data sets with an official validation folder use that instead); a run passes its
      own (0.2 by default), ``vad datasets info`` passes 0.1 unless told otherwise;
    * ``seed`` (0): makes that hold-out deterministic;
    * ``skip_bad`` (False): images that fail a header check while indexing are skipped and
      listed in ``self.skipped`` as ``(path, reason)``; otherwise the first raises
      :class:`vad.images.BadImageError` naming it.

    Data sets with more options declare them in ``class Options(FileDataset.Options)``.
    """

    name: ClassVar[str] = ""
    #: Where the official data can be obtained (shown when the root is wrong).
    official_url: ClassVar[str] = ""
    #: The expected folder layout, shown when the root is wrong.
    expected_layout: ClassVar[str] = ""
    #: Official category names (used for suggestions and ``vad datasets info``).
    known_categories: ClassVar[tuple[str, ...]] = ()

    def __init__(self, root: str | None = None, **options: Any) -> None:
        super().__init__(root, **options)
        #: ``(path, reason)`` of every image skipped by the header check (``skip_bad=True``).
        self.skipped: list[tuple[str, str]] = []

    # -- errors -----------------------------------------------------------------

    def layout_error(self, problem: str) -> LayoutError:
        """A :class:`LayoutError` that shows the expected layout and where to get the data."""
        message = f"{problem}\nExpected layout for --dataset {self.name}:\n{self.expected_layout.strip()}"
        if self.official_url:
            message += f"\nThe official data can be obtained from {self.official_url} (vad never downloads it)."
        return LayoutError(message)

    def root_path(self) -> Path:
        """The root as a Path, or a clear error when it is missing."""
        if self.root is None or str(self.root) == "":
            raise self.layout_error(f"--dataset {self.name} needs --root: the folder that holds the data set.")
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise self.layout_error(f"root {root} does not exist or is not a folder.")
        return root

    def unknown_category(self, category: str, available: Sequence[str]) -> VadError:
        """The error for a category that is not there, suggesting the nearest name."""
        if category in self.known_categories:
            return self.layout_error(
                f"category {category!r} is not under {self.root}. Present: {', '.join(available) or 'none'}."
            )
        pool = sorted(set(available) | set(self.known_categories))
        close = difflib.get_close_matches(category, pool, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return UnknownCategoryError(
            f"unknown {self.name} category {category!r}.{hint} Present under {self.root}: {', '.join(available) or 'none'}"
        )

    def check_category(self, category: str) -> None:
        """Raise unless ``category`` is present: a category folder that lacks the layout says
        what is missing inside it; an unknown name gets the nearest one."""
        marker = self.category_marker()
        folder = self.root_path() / category
        # (a folder holding categories is a multi-view product: its views are the categories)
        if marker and folder.is_dir() and not self.is_category(folder) and not any(map(self.is_category, subfolders(folder))):
            raise self.layout_error(f"category folder {lacks(folder, marker)}.")
        available = self.categories()
        if category not in available:
            raise self.unknown_category(category, available)

    # -- categories found by a marker folder ------------------------------------

    def category_marker(self) -> str | None:
        """The folder inside a category folder that makes it one (``train/good``); None for data
        sets that find their categories otherwise (a split file, options)."""
        return None

    def is_category(self, folder: Path) -> bool:
        """True when ``folder`` holds :meth:`category_marker`."""
        return (folder / self.category_marker()).is_dir()

    def no_category_error(self, root: Path, what: str = "category") -> LayoutError:
        """No folder under ``root`` holds the marker: say what the folders there lack, or that
        the root itself is one category."""
        marker = self.category_marker()
        problem = f"no {what} folder found under {root}"
        folders = subfolders(root)
        if self.is_category(root):
            problem += f". {root} itself looks like one {what}: pass its parent folder as --root and --category {root.name}"
        elif folders:
            details = "; ".join(lacks(folder, marker) for folder in folders[:3])
            more = f"; and {len(folders) - 3} more folders" if len(folders) > 3 else ""
            problem += f": a {what} folder holds {marker}/, but {details}{more}"
        return self.layout_error(f"{problem}.")

    def categories(self) -> list[str]:
        """Folders under the root that hold :meth:`category_marker` (data sets without one override this)."""
        root = self.root_path()
        found = [folder.name for folder in subfolders(root) if self.is_category(folder)]
        if not found:
            raise self.no_category_error(root)
        return found

    # -- indexing ---------------------------------------------------------------

    def readable(self, path: Path) -> bool:
        """Cheap header check; bad files raise, or are listed in ``skipped`` with ``skip_bad``."""
        try:
            if path.stat().st_size == 0:
                raise BadImageError(path, "empty file")
            image_size(path)
        except BadImageError as error:
            if not self.options.skip_bad:
                reason = str(error).removeprefix(f"cannot read image {error.path}: ")
                raise BadImageError(path, f"{reason} (pass --skip-bad to skip such files)") from error
            if (str(path), str(error)) not in self.skipped:  # loading a category twice lists it once
                self.skipped.append((str(path), str(error)))
            return False
        return True

    def images(self, folder: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
        """Readable images of ``folder``, sorted."""
        return [p for p in list_images(folder, extensions) if self.readable(p)]

    def sample(
        self,
        path: Path,
        *,
        label: int,
        category: str,
        split: str,
        defect_type: str = "good",
        mask: Any = None,
        regions: tuple[Region, ...] = (),
        anomaly_kind: str | None = None,
        view: str | None = None,
    ) -> Sample:
        """A lazily decoded :class:`Sample`; ``mask`` is a loader or None."""
        return Sample(
            path=str(path),
            label=int(label),
            category=category,
            split=split,  # type: ignore[arg-type]
            defect_type=defect_type,
            image_loader=image_loader(path),
            mask_loader=mask,
            regions=regions,
            anomaly_kind=anomaly_kind,
            view=view,
        )

    def train_and_validation(self, paths: Sequence[Path], category: str, view: str | None = None) -> tuple[list[Sample], list[Sample]]:
        """Normal training images split into train / validation by ``validation_fraction``."""
        kept, held_out = split_validation(list(paths), self.options.validation_fraction, self.options.seed)
        train = [self.sample(p, label=0, category=category, split="train", view=view) for p in kept]
        validation = [self.sample(p, label=0, category=category, split="validation", view=view) for p in held_out]
        return train, validation

    def require_train(self, paths: Sequence[Path], folder: Path) -> None:
        """Error when the training folder holds no usable image."""
        if not paths:
            skipped = " (every file there was skipped as unreadable)" if list_images(folder) else ""
            raise self.layout_error(f"no training images in {folder}{skipped}: a category needs normal training images.")

    def summary(self, splits: DataSplits) -> dict[str, dict[str, int]]:
        """``{split: {defect_type: count}}`` (used by ``vad datasets info``)."""
        out: dict[str, dict[str, int]] = {}
        for split_name in ("train", "validation", "test"):
            counts: dict[str, int] = {}
            for s in getattr(splits, split_name):
                counts[s.defect_type] = counts.get(s.defect_type, 0) + 1
            out[split_name] = counts
        return out
