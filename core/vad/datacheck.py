"""Every image and mask a run will read, decoded once before anything is fitted or written.

A data set's index checks file headers only; a truncated file, a corrupt mask or a mask of the
wrong size shows only when its pixels are decoded. Decoding everything first costs one extra
read of the data (in threads), and in exchange a bad file stops the run before the fit instead
of after it, and ``--skip-bad`` leaves such samples out of every count, split and threshold
(images and masks alike: a test image whose mask is bad is left out with it), listing each.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

from vad.contracts import DataSplits, Sample
from vad.errors import VadError
from vad.progress import track, warn

#: Bad files named in the error when the run stops (the rest are counted).
SHOWN = 5


@dataclasses.dataclass(frozen=True)
class BadSample:
    """A sample whose image or mask cannot be used, and why."""

    path: str
    reason: str


def problem(sample: Sample) -> str | None:
    """Why ``sample`` cannot be used (unreadable image, unreadable mask, mask size differs from
    the image's), or None."""
    try:
        image = sample.load_image()
    except (VadError, OSError, ValueError) as error:
        return str(error)
    try:
        mask = sample.load_mask()
    except (VadError, OSError, ValueError) as error:
        return f"its mask: {error}"
    if mask is not None and tuple(mask.shape[:2]) != tuple(image.shape[:2]):
        (mh, mw), (ih, iw) = mask.shape[:2], image.shape[:2]
        return f"its mask is {mw}x{mh} px, the image {iw}x{ih} px"
    return None


def check_splits(splits: DataSplits, skip_bad: bool) -> tuple[DataSplits, list[BadSample]]:
    """``splits`` without bad samples and the bad ones (``skip_bad``), or a :class:`VadError`
    naming them (without ``skip_bad``). Decodes every image and mask once, in threads."""
    samples = [*splits.train, *splits.validation, *splits.test]
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        problems = list(track(pool.map(problem, samples), f"check {splits.category}", total=len(samples)))
    bad = [BadSample(sample.path, reason) for sample, reason in zip(samples, problems) if reason is not None]
    if not bad:
        return splits, []
    if not skip_bad:
        listed = "; ".join(f"{b.path} ({b.reason})" for b in bad[:SHOWN])
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise VadError(
            f"[{splits.category}] {len(bad)} unusable file(s): {listed}{more}. Nothing was fitted or written; "
            "fix or remove them, or pass --skip-bad to leave those images (and images with bad masks) out and list them"
        )
    bad_paths = {b.path for b in bad}
    kept = {name: [s for s in getattr(splits, name) if s.path not in bad_paths] for name in ("train", "validation", "test")}
    warn(f"[{splits.category}] --skip-bad: left out {len(bad)} image(s): " + "; ".join(f"{b.path} ({b.reason})" for b in bad))
    return dataclasses.replace(splits, **kept), bad
