"""``vad serve``: a saved model behind an HTTP API (FastAPI on uvicorn).

Endpoints:

* ``POST /predict``: a multipart form with one or more image files in the field ``images``;
  ``?maps=true`` adds each anomaly map as a 16-bit grayscale PNG (base64) with the value range
  it spans. Answers ``{"results": [{"name", "score", "anomalous", "image_threshold",
  "registration_error", "map_png", "map_range"}, ...]}`` in the order of the files.
* ``GET /health``: ``{"status": "ok", "waiting_images": n}`` while the scoring worker runs.
* ``GET /model``: what is loaded: detectors, ensemble, preprocessing, geometry, thresholds,
  region of interest and registration, vad version.

Concurrent requests are batched: one worker thread owns the model and scores the images of
every request waiting, up to ``max_batch`` images gathered for at most ``max_wait_ms`` after the
first, in one call; each request gets its own results back. Bad input never reaches the model
and gets a 4xx with a message naming the file: 400 no file / not a decodable image / a size the
model cannot score (its ROI's, its reference's, its aspect ratio), 413 a file over
``max_bytes`` or an image over ``max_pixels``, 415 a declared content type that is not an image.
A failure inside the model answers 500 with its message; the service keeps running.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime,
# and the types they name are imported inside create_app.
import base64
import io
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vad.errors import VadError

#: Defaults of ``vad serve``.
MAX_BATCH, MAX_WAIT_MS, MAX_BYTES, MAX_PIXELS = 8, 5.0, 20_000_000, 50_000_000


def require_serving() -> None:
    """FastAPI, uvicorn and python-multipart, or a clear error on how to install them."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise VadError(f"vad serve needs FastAPI, uvicorn and python-multipart ({', '.join(missing)} missing): pip install 'vad-core[serve]'")


@dataclass
class _Job:
    images: list[tuple[str, np.ndarray]]
    future: Future = field(default_factory=Future)


class Batcher:
    """One thread owning the model: gathers waiting jobs into batches and scores them."""

    def __init__(self, model: Any, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise VadError(f"max_batch must be at least 1 and max_wait_ms at least 0, got {max_batch} and {max_wait_ms}")
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait_ms / 1000.0
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.waiting = 0
        self._count_lock = threading.Lock()
        self.batches: list[int] = []  # images per model call, for the load test and the tests
        self.thread = threading.Thread(target=self._work, name="vad-serve-batcher", daemon=True)
        self.thread.start()

    def submit(self, images: list[tuple[str, np.ndarray]]) -> Future:
        """Score ``(name, RGB uint8 image)`` pairs; the future gives one Output per image."""
        job = _Job(images)
        with self._count_lock:
            self.waiting += len(images)
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, count = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait
            while count < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
                count += len(job.images)
            self._score(batch, count)

    def _score(self, batch: list[_Job], count: int) -> None:
        from vad.contracts import Sample

        samples = [
            Sample(path=name, label=0, category="serve", split="test", image_loader=lambda image=image: image)
            for job in batch for name, image in job.images
        ]
        try:
            outputs = list(self.model.predict(samples, description="serve"))
            if len(outputs) != len(samples):
                raise VadError(f"the model scored {len(outputs)} of {len(samples)} images")
        except Exception as error:  # the model failed: every request of the batch hears why
            for job in batch:
                job.future.set_exception(error)
        else:
            self.batches.append(count)
            start = 0
            for job in batch:
                job.future.set_result(outputs[start : start + len(job.images)])
                start += len(job.images)
        finally:
            with self._count_lock:
                self.waiting -= count


def map_png(anomaly_map: np.ndarray) -> tuple[str, list[float]]:
    """A map as a base64 16-bit grayscale PNG spanning its ``[min, max]`` (returned with it)."""
    from PIL import Image

    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = np.zeros(anomaly_map.shape, np.uint16) if high <= low else np.round((anomaly_map - low) / (high - low) * 65535).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(scaled).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), [low, high]


def describe_model(model: Any, folder: str) -> dict[str, Any]:
    """``GET /model``: what is loaded and how it reads images."""
    import vad

    member = model.members[0]
    return {
        "folder": folder,
        "vad_version": vad.__version__,
        "detectors": [m.detector_name for m in model.members],
        "ensemble": model.ensembler_name,
        "preprocessing": model.input_preprocessing(member).to_dict(),
        "geometry": model.geometry.to_dict(),
        "threshold": {"rule": model.threshold_name, "image": model.image_threshold, "pixel": model.pixel_threshold},
        "produces_maps": model.produces_maps,
        "roi": None if model.roi is None else model.roi.to_document()[0],
        "registration": None if model.registration is None else model.registration.to_document()[0],
    }


def create_app(model: Any, folder: str = "", max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
               max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Any:
    """The FastAPI application serving ``model`` (see the module docstring)."""
    require_serving()
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, HTTPException, Query, UploadFile

    from vad.images import decode_rgb
    from vad.predict import check_image_fits

    batcher = Batcher(model, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="vad", summary="Visual anomaly detection: score images with a fitted model.", lifespan=lifespan)
    app.state.batcher = batcher
    description = describe_model(model, folder)

    @app.get("/health")
    def health() -> dict[str, Any]:
        if not batcher.thread.is_alive():
            raise HTTPException(503, "the scoring worker has stopped")
        return {"status": "ok", "waiting_images": batcher.waiting}

    @app.get("/model")
    def model_info() -> dict[str, Any]:
        return description

    @app.post("/predict")
    async def predict(images: list[UploadFile] = File(default=[]), maps: bool = Query(False, description="Add each anomaly map as a PNG.")) -> dict[str, Any]:
        if not images:
            raise HTTPException(400, "no image: send one or more files in the multipart field 'images'")
        decoded = []
        for index, upload in enumerate(images):
            name = upload.filename or f"image {index}"
            if upload.content_type and not (upload.content_type.startswith("image/") or upload.content_type == "application/octet-stream"):
                raise HTTPException(415, f"{name}: content type {upload.content_type!r} is not an image")
            data = await upload.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise HTTPException(413, f"{name}: larger than the {max_bytes} bytes this service accepts")
            try:
                from PIL import Image

                with Image.open(io.BytesIO(data)) as header:
                    width, height = header.size
                if width * height > max_pixels:
                    raise HTTPException(413, f"{name}: {width}x{height} px is more than the {max_pixels} pixels this service accepts")
                image = decode_rgb(data, name)
                check_image_fits(model, image.shape[:2], name)
            except HTTPException:
                raise
            except VadError as error:
                raise HTTPException(400, str(error)) from error
            except Exception as error:  # PIL raises many types on hostile input
                raise HTTPException(400, f"cannot read image {name}: {error}") from error
            decoded.append((name, image))
        try:
            outputs = await asyncio.wrap_future(batcher.submit(decoded))
        except Exception as error:
            raise HTTPException(500, f"the model failed on this batch: {error}") from error
        results = []
        for output in outputs:
            record: dict[str, Any] = {
                "name": output.sample.path,
                "score": output.score,
                "anomalous": output.anomalous,
                "image_threshold": model.image_threshold,
                "registration_error": output.registration_error,
            }
            if maps and output.map is not None:
                record["map_png"], record["map_range"] = map_png(output.map)
            results.append(record)
        return {"results": results}

    return app


def serve(folder: str, host: str, port: int, device: str = "auto", **limits: Any) -> None:
    """Load the model in ``folder`` and serve it until interrupted."""
    require_serving()
    import uvicorn

    from vad.model import AnomalyModel, resolve_device
    from vad.predict import resolve_model_folder
    from vad.progress import info, log_mode, set_log_mode

    model_folder = resolve_model_folder(folder)
    model = AnomalyModel.load(model_folder, resolve_device(device))
    info(f"serving {model_folder} on http://{host}:{port} (POST /predict, GET /health, GET /model)")
    if log_mode() == "rich":
        set_log_mode("quiet")  # no progress bar per request
    uvicorn.run(create_app(model, str(model_folder), **limits), host=host, port=port, log_level="warning")
