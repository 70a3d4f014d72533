"""``vad predict``: apply a saved model to new images (no ground truth needed).

Inputs are image files, folders (searched recursively for image extensions) or glob patterns.
For each image: the raw score, the decision at the model's stored image threshold, the map
maximum and, with ``--overlays DIR``, a PNG strip image | anomaly map | predicted mask at the
stored pixel threshold (colour scale: see :mod:`vad.report`; here from each image's own
minimum to twice the threshold minus it, so red always means "above the threshold").
Records go out as JSON lines (default) or CSV, one per image in input order, then one per input
that matched nothing. An input that could not be scored (unreadable file, an image the model's
geometry refuses, an input that matched nothing) keeps its row, with an ``error`` message and
empty score and decision, and the command exits with code 3 (:data:`vad.errors.SOME_FAILED`);
it fails (exit code 2) only when no image at all could be scored. A model without a stored
threshold scores but leaves decisions (or the overlays' masks) empty, with a warning saying how
to get one.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vad.errors import VadError
from vad.images import IMAGE_EXTENSIONS

FIELDS = ["path", "score", "anomalous", "image_threshold", "map_max", "overlay", "error"]
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
    """What ``predict_images`` produced: one record per image and per input that matched nothing."""

    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The records of inputs that could not be scored (an ``error`` message, no score)."""
        return [record for record in self.records if record["error"] is not None]


def threshold_warnings(model: Any, folder: str | Path, overlays: bool) -> list[str]:
    """One warning per threshold ``model`` lacks: the image threshold (decisions are left empty)
    and, with ``overlays`` of a model with maps, the pixel threshold (the predicted-mask panels
    are left empty); each says how to get one (thresholds are fitted by ``vad run`` and stored in
    ``model.json``; a score at or above one counts as anomalous)."""
    from vad.artifacts import MODEL_JSON

    document = Path(folder) / MODEL_JSON
    missing = [("image", model.image_threshold, "every decision ('anomalous') is left empty")]
    if overlays and model.produces_maps:
        missing.append(("pixel", model.pixel_threshold, "the overlays' predicted-mask panels are left empty"))
    return [
        f"the model has no {level} threshold (threshold.{level} in {document} is null or missing), so {consequence}; "
        f"to get one, fit the model again with a threshold rule (`vad run ... --threshold conformal`, or "
        f"`--threshold manual --set manual.value=V` for a fixed score), or write a number into threshold.{level} "
        f"of {document} (scores at or above it count as anomalous)"
        for level, value, consequence in missing
        if value is None
    ]


def _overlay_name(path: str, used: set[str]) -> str:
    from vad.report import _safe_name

    stem = _safe_name(Path(path).stem)
    name, counter = f"{stem}.png", 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}.png"
    used.add(name)
    return name


def check_image_fits(model: Any, size: tuple[int, int], name: str) -> None:
    """A clear error when an image of ``size`` cannot be scored by ``model``: a size its geometry
    refuses (``--keep-aspect``), or another than its region of interest's or registration
    reference's."""
    model.geometry.check_image(size, name)
    for frame in (model.roi, model.registration):
        if frame is not None:
            frame.check_image(size, name)


def _refused_from_headers(model: Any, paths: Sequence[str]) -> dict[str, str]:
    """``{path: reason}`` for the images that cannot be scored as far as their file headers tell:
    an unreadable header, or a size the model's geometry refuses (``--keep-aspect``: another
    aspect ratio) or its region of interest does not fit, which would stop the whole call if
    found while scoring a batch."""
    from vad.images import image_size

    refused = {}
    for path in paths:
        try:
            check_image_fits(model, image_size(path), path)
        except VadError as error:
            refused[path] = str(error)
    return refused


def failure_record(path: str, error: str, model: Any) -> dict[str, Any]:
    """The record of an input that could not be scored."""
    return {"path": path, "score": None, "anomalous": None, "image_threshold": model.image_threshold, "map_max": None, "overlay": None, "error": error}


def graph_outputs(model: Any, graph: Any, samples: Sequence[Any]) -> Iterator[Any]:
    """Outputs of an exported graph (:class:`vad.export.GraphSession`) for ``samples``, as
    ``model.predict`` gives them: decoded and registered as the model does (the graph paints
    and restricts to the region of interest itself), the maps brought to each image's original
    size (and frame) after it, the model's decision; unreadable images go to ``model.skipped``."""
    import torch

    from vad.model import Output, load_images

    reference = model.input_preprocessing(model.members[0])
    for sample in samples:
        alignments: list[Any] = []
        _, images = load_images([sample], model.skip_bad, model.skipped, None, model.registration, alignments)
        if not images:
            continue
        score, working = graph(images[0])
        anomaly_map = None if working is None else model.original_maps(torch.from_numpy(working)[None], reference, [images[0].shape[:2]], alignments)[0]
        yield Output(sample, score, model.decide(score), anomaly_map, alignments[0].error if alignments else None)


def predict_images(model: Any, inputs: Sequence[str], overlays: str | Path | None = None, graph: Any = None) -> PredictResult:
    """Score the images named by ``inputs`` with a loaded :class:`vad.model.AnomalyModel`, or
    with its exported ``graph`` (:class:`vad.export.GraphSession`).

    Inputs that cannot be scored get a record with an ``error``; a :class:`VadError` when no
    image at all could be scored.
    """
    import numpy as np

    from vad import artifacts
    from vad.report import color_range, overlay_strip, png_bytes

    paths, unmatched = collect_images(inputs)
    if not paths:
        raise VadError(
            "no image found for " + ", ".join(repr(i) for i in inputs)
            + f" (files, folders searched for {', '.join(IMAGE_EXTENSIONS)}, or glob patterns)"
        )
    errors = _refused_from_headers(model, paths)
    model.skip_bad = True
    model.skipped = []
    used: set[str] = set()
    overlay_folder = Path(overlays) if overlays else None
    scored: dict[str, dict[str, Any]] = {}
    samples = make_samples(p for p in paths if p not in errors)
    for output in model.predict(samples, description="predict") if graph is None else graph_outputs(model, graph, samples):
        record: dict[str, Any] = {
            "path": output.sample.path,
            "score": output.score,
            "anomalous": output.anomalous,
            "image_threshold": model.image_threshold,
            "map_max": None if output.map is None else float(np.max(output.map)),
            "overlay": None,
            "error": None,
            **({"registration_error": output.registration_error} if model.registration is not None else {}),
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
        scored[record["path"]] = record
    errors.update((skipped.path, skipped.reason) for skipped in model.skipped)
    nothing_there = f"no image found there (not an image file, a folder with {', '.join(IMAGE_EXTENSIONS)} files, or a glob pattern matching files)"
    failures = {path: errors[path] for path in paths if path not in scored} | {item: f"{item}: {nothing_there}" for item in unmatched}
    if not scored:
        reasons = list(failures.values())
        more = f"; and {len(reasons) - 3} more" if len(reasons) > 3 else ""
        raise VadError(f"no image could be scored: {'; '.join(reasons[:3])}{more}")
    return PredictResult([scored[item] if item in scored else failure_record(item, failures[item], model) for item in [*paths, *unmatched]])


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
