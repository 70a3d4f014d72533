"""``vad predict``: apply a saved model to new images (no ground truth needed).

Inputs are image files, folders (searched recursively for image extensions) or glob patterns.
For each image: the raw score, the decision at the model's stored image threshold, the map
maximum and, with ``--overlays DIR``, a PNG strip image | anomaly map | predicted mask at the
stored pixel threshold (colour scale: see :mod:`vad.report`; here from each image's own
minimum to twice the threshold minus it, so red always means "above the threshold").
Records go out as JSON lines (default) or CSV. Unreadable images are reported and skipped;
the call fails only when no image at all could be scored.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vad.errors import VadError
from vad.images import IMAGE_EXTENSIONS

FIELDS = ["path", "score", "anomalous", "image_threshold", "map_max", "overlay"]
FORMATS = ("jsonl", "csv")


def collect_images(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Image paths for files, folders (recursive) and globs; and the inputs that matched nothing.

    Order: as given; inside a folder or glob, sorted. Duplicates are dropped.
    """
    found: list[str] = []
    unmatched: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            matches = [str(path)]
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            matches = []
        if not matches:
            unmatched.append(item)
        found.extend(matches)
    return list(dict.fromkeys(found)), unmatched


def make_samples(paths: Iterable[str]) -> list[Any]:
    """Test samples without labels (label 0 is a placeholder; it is never used)."""
    from vad.contracts import Sample
    from vad.images import read_rgb

    return [
        Sample(path=p, label=0, category="predict", split="test", defect_type="unknown", image_loader=lambda p=p: read_rgb(p))
        for p in paths
    ]


@dataclass
class PredictResult:
    """What ``predict_images`` produced."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _overlay_name(path: str, used: set[str]) -> str:
    from vad.report import _safe_name

    stem = _safe_name(Path(path).stem)
    name, counter = f"{stem}.png", 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}.png"
    used.add(name)
    return name


def predict_images(model: Any, inputs: Sequence[str], overlays: str | Path | None = None) -> PredictResult:
    """Score the images named by ``inputs`` with a loaded :class:`vad.model.AnomalyModel`."""
    import numpy as np

    from vad import artifacts
    from vad.report import color_range, overlay_strip, png_bytes

    paths, unmatched = collect_images(inputs)
    result = PredictResult(unmatched=unmatched)
    if not paths:
        raise VadError(
            "no image found for " + ", ".join(repr(i) for i in inputs)
            + f" (files, folders searched for {', '.join(IMAGE_EXTENSIONS)}, or glob patterns)"
        )
    model.skip_bad = True
    model.skipped = []
    used: set[str] = set()
    overlay_folder = Path(overlays) if overlays else None
    for output in model.predict(make_samples(paths), description="predict"):
        record: dict[str, Any] = {
            "path": output.sample.path,
            "score": output.score,
            "anomalous": output.anomalous,
            "image_threshold": model.image_threshold,
            "map_max": None if output.map is None else float(np.max(output.map)),
            "overlay": None,
        }
        if overlay_folder is not None:
            image = output.sample.load_image()
            low = float(np.min(output.map)) if output.map is not None else 0.0
            high = float(np.max(output.map)) if output.map is not None else 1.0
            decision = "n/a" if output.anomalous is None else ("ANOMALOUS" if output.anomalous else "good")
            strip = overlay_strip(
                image, output.map, None, model.pixel_threshold, color_range(low, high, model.pixel_threshold),
                caption=f"{Path(output.sample.path).name}  score {output.score:.4g}  decision {decision}", show_truth=False,
            )
            target = overlay_folder / _overlay_name(output.sample.path, used)
            artifacts.atomic_write_bytes(target, png_bytes(strip))
            record["overlay"] = str(target)
        result.records.append(record)
    result.skipped = [(s.path, s.reason) for s in model.skipped]
    return result


def format_records(records: list[dict[str, Any]], fmt: str) -> str:
    """JSON lines or CSV (header + one row per image; missing values empty)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            row = {k: ("" if record.get(k) is None else record[k]) for k in FIELDS}
            if isinstance(record.get("anomalous"), bool):
                row["anomalous"] = int(record["anomalous"])
            writer.writerow(row)
        return buffer.getvalue()
    raise VadError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def resolve_model_folder(folder: str | Path) -> Path:
    """A model folder, or a run folder holding exactly one ``<category>/model``."""
    from vad.artifacts import MODEL_JSON

    folder = Path(folder)
    if (folder / MODEL_JSON).is_file():
        return folder
    candidates = sorted(p.parent for p in folder.glob(f"*/model/{MODEL_JSON}"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise VadError(
            f"{folder} is a run folder with several models; pass one of: " + ", ".join(str(c) for c in candidates)
        )
    raise VadError(f"--model {folder}: no {MODEL_JSON} there (pass a model folder, e.g. runs/<run>/<category>/model)")
