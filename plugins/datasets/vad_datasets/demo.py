"""The embedded demo data set: scikit-image's CC0 textures with synthetic defects.

Three categories (``brick``, ``grass``, ``gravel``), each in the MVTec AD layout: 24 good
training crops, 8 good test crops and 12 defective test crops (4 each of ``scratch``,
``stain``, ``foreign_patch``) with exact masks; 128x128 RGB (the gray texture times a fixed
per-category tint). Training crops come from the top 320 rows of each 512x512 texture and test
crops from the bottom 192 rows, so test images are never copies of training pixels.
Defects (:mod:`vad_datasets.synth`) are scaled to each crop's contrast: on this data PatchCore
(tf_efficientnet_lite0, defaults) reaches image AUROC 1.00 / 0.94 / 0.97 and pixel AUROC
0.99 / 0.97 / 0.92 (brick / grass / gravel): clearly detectable, not trivially so.

Built on first use, seeded (the same bytes every time), into ``$VAD_CACHE_DIR/demo-v1`` or
``~/.cache/vad/demo-v1``: written to a temporary sibling folder and renamed into place, so an
interrupted build never leaves half a cache. ``manifest.json`` (SHA-256 of every file) is
written last and marks a complete build.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from vad.errors import VadError

from vad_datasets.mvtec import MVTecAD

VERSION = "demo-v1"
SEED = 20240601
SIZE = 128
COUNTS = {"train": 24, "test_good": 8, "defects_per_type": 4}
TEXTURES = ("brick", "grass", "gravel")
#: Per-category RGB tint applied to the gray texture.
TINTS = {"brick": (1.0, 0.84, 0.74), "grass": (0.8, 1.0, 0.7), "gravel": (0.96, 0.96, 1.0)}
#: The texture a category's foreign patches come from.
FOREIGN = {"brick": "gravel", "grass": "brick", "gravel": "grass"}
TRAIN_ROWS = 320  # rows [0, 320) give training crops, rows [320, 512) test crops


def default_cache_dir() -> Path:
    """``$VAD_CACHE_DIR/demo-v1`` or ``~/.cache/vad/demo-v1``."""
    base = os.environ.get("VAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vad")
    return Path(base) / VERSION


def _png_bytes(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate(textures: dict | None = None) -> dict[str, bytes]:
    """Every file of the demo data set as ``{relative path: PNG bytes}`` (no disk access)."""
    import numpy as np

    from vad_datasets.synth import DEFECTS, apply_defect

    if textures is None:
        from skimage import data

        textures = {name: getattr(data, name)() for name in TEXTURES}
    files: dict[str, bytes] = {}
    for index, name in enumerate(TEXTURES):
        texture = np.asarray(textures[name], dtype=np.float32)
        foreign_texture = np.asarray(textures[FOREIGN[name]], dtype=np.float32)
        rng = np.random.default_rng([SEED, index])
        tint = np.asarray(TINTS[name], dtype=np.float32)
        height, width = texture.shape

        def crop(source, top_range, rng=rng):
            y = int(rng.integers(top_range[0], top_range[1] - SIZE + 1))
            x = int(rng.integers(0, width - SIZE + 1))
            return source[y : y + SIZE, x : x + SIZE].copy()

        def rgb(gray, tint=tint):
            return np.clip(np.round(gray[..., None] * tint), 0, 255).astype(np.uint8)

        for i in range(COUNTS["train"]):
            files[f"{name}/train/good/{i:03d}.png"] = _png_bytes(rgb(crop(texture, (0, TRAIN_ROWS))))
        for i in range(COUNTS["test_good"]):
            files[f"{name}/test/good/{i:03d}.png"] = _png_bytes(rgb(crop(texture, (TRAIN_ROWS, height))))
        for defect in DEFECTS:
            for i in range(COUNTS["defects_per_type"]):
                clean = crop(texture, (TRAIN_ROWS, height))
                foreign = crop(foreign_texture, (0, height))
                damaged, mask = apply_defect(defect, clean, foreign, rng)
                files[f"{name}/test/{defect}/{i:03d}.png"] = _png_bytes(rgb(damaged))
                files[f"{name}/ground_truth/{defect}/{i:03d}_mask.png"] = _png_bytes(mask.astype(np.uint8) * 255)
    files["LICENSE.txt"] = (
        "Built by vad-datasets from scikit-image's brick, grass and gravel textures (CC0, "
        "https://scikit-image.org/docs/stable/api/skimage.data.html); the synthetic defects are "
        "generated. Public domain (CC0).\n"
    ).encode()
    return files


def generator_fingerprint() -> str:
    """SHA-256 of the code that draws the demo (this module and :mod:`vad_datasets.synth`).

    Stored in the manifest: a cache drawn by other code (an older or newer vad-datasets) is
    rebuilt instead of silently reused.
    """
    import inspect
    import sys

    from vad_datasets import synth

    source = inspect.getsource(sys.modules[__name__]) + inspect.getsource(synth)
    return hashlib.sha256(source.encode()).hexdigest()


def manifest_of(files: dict[str, bytes]) -> dict:
    """``{"version", "generator", "files": {path: sha256}}``."""
    return {
        "version": VERSION,
        "generator": generator_fingerprint(),
        "files": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())},
    }


def expected_paths() -> set[str]:
    """Relative paths of every file a build writes (manifest included), without building."""
    from vad_datasets.synth import DEFECTS

    paths = {"LICENSE.txt", "manifest.json"}
    for name in TEXTURES:
        paths |= {f"{name}/train/good/{i:03d}.png" for i in range(COUNTS["train"])}
        paths |= {f"{name}/test/good/{i:03d}.png" for i in range(COUNTS["test_good"])}
        for defect in DEFECTS:
            for i in range(COUNTS["defects_per_type"]):
                paths |= {f"{name}/test/{defect}/{i:03d}.png", f"{name}/ground_truth/{defect}/{i:03d}_mask.png"}
    return paths


def _replaceable(folder: Path) -> bool:
    """True when ``folder`` holds nothing but (part of) a demo build: safe to replace."""
    expected = expected_paths()
    return all(str(p.relative_to(folder)) in expected for p in folder.rglob("*") if p.is_file())


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished build of this version."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("version") == VERSION
        and manifest.get("generator") == generator_fingerprint()
        and all((folder / path).is_file() for path in manifest.get("files", {}))
    )


def build(folder: Path | None = None) -> Path:
    """Build the demo data set into ``folder`` (default cache) unless it is already complete."""
    folder = Path(folder) if folder is not None else default_cache_dir()
    if is_complete(folder):
        return folder
    if folder.exists() and not (folder.is_dir() and _replaceable(folder)):
        raise VadError(
            f"{folder} exists but is not a vad demo data set; vad will not overwrite it. Give the demo "
            "an empty or new folder as --root, or leave --root unset to use the cache"
        )
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-building-", dir=folder.parent))
    except OSError as error:
        raise VadError(f"cannot create the demo data set under {folder.parent}: {error}; set VAD_CACHE_DIR to a writable folder") from error
    try:
        files = generate()
        for path, data in files.items():
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (staging / "manifest.json").write_text(json.dumps(manifest_of(files), indent=1, sort_keys=True))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if folder.exists():  # an incomplete or outdated folder: move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}-stale-", dir=folder.parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, folder)
        except OSError:
            if not is_complete(folder):  # another process finished first: use its build
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


class DemoDataset(MVTecAD):
    """Embedded demo: brick, grass and gravel textures with scratches, stains and foreign patches.

    ``root`` is where the data set is (or will be) built; default the cache
    (``$VAD_CACHE_DIR/demo-v1`` or ``~/.cache/vad/demo-v1``). Loaded with the MVTec AD loader.
    """

    name = "demo"
    official_url = ""
    known_categories = TEXTURES

    def root_path(self) -> Path:
        """The built demo folder (built now if needed; checked once per object)."""
        folder = getattr(self, "_built", None)
        if folder is None:
            folder = self._built = build(Path(self.root).expanduser() if self.root else None)
            self.root = str(folder)
        return folder

    def categories(self) -> list[str]:
        """``brick``, ``grass``, ``gravel``."""
        self.root_path()
        return list(TEXTURES)
