"""``vad serve``: scores like the model, maps as PNG, batching of concurrent requests, and a
clear 4xx for every kind of bad input without taking the service down."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image


pytest.importorskip("fastapi")


@pytest.fixture
def registry(report_registry):
    return report_registry


@pytest.fixture
def fitted(registry, tmp_path):
    """A model fitted on the tiny data (fake backbone) and reloaded, and its folder."""
    from vad.config import RunConfig
    from vad.model import AnomalyModel
    from vad.pipeline import run

    config = RunConfig(dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu",
                       categories=["tiny-a"], report=False, output=str(tmp_path / "run"))
    run_folder, _ = run(config, registry)
    return AnomalyModel.load(run_folder / "tiny-a" / "model", "cpu", registry), str(run_folder / "tiny-a" / "model")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def images(count: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def client_for(model, folder, **limits):
    from fastapi.testclient import TestClient

    from vad.serve import create_app

    return TestClient(create_app(model, folder, **limits))


def test_scores_match_the_model_and_maps_come_back_as_png(fitted):
    from vad.contracts import Sample

    model, folder = fitted
    batch = images(3)
    expected = [o for o in model.predict([Sample(f"m{i}", 0, "x", "test", image_loader=lambda im=im: im) for i, im in enumerate(batch)])]
    with client_for(model, folder) as client:
        assert client.get("/health").json()["status"] == "ok"
        info = client.get("/model").json()
        assert info["detectors"] == ["report-distance"] and info["threshold"]["image"] == model.image_threshold
        files = [("images", (f"part{i}.png", png(im), "image/png")) for i, im in enumerate(batch)]
        answer = client.post("/predict?maps=true", files=files)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["name"] for r in results] == ["part0.png", "part1.png", "part2.png"]
    np.testing.assert_allclose([r["score"] for r in results], [o.score for o in expected], rtol=1e-6)
    assert [r["anomalous"] for r in results] == [o.anomalous for o in expected]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(results[0]["map_png"]))), dtype=np.float64)
    low, high = results[0]["map_range"]
    np.testing.assert_allclose(low + decoded / 65535 * (high - low), expected[0].map, atol=(high - low) / 65535 + 1e-6)


def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_answering(fitted):
    model, folder = fitted
    good = png(images(1)[0])
    with client_for(model, folder, max_bytes=60_000, max_pixels=10_000) as client:
        cases = [
            (client.post("/predict"), 400, "no image"),
            (client.post("/predict", files=[("images", ("notes.png", b"not an image at all", "image/png"))]), 400, "cannot read image notes.png"),
            (client.post("/predict", files=[("images", ("notes.txt", b"hello", "text/plain"))]), 415, "not an image"),
            (client.post("/predict", files=[("images", ("big.png", good + b"\0" * 60_000, "image/png"))]), 413, "larger than the 60000 bytes"),
            (client.post("/predict", files=[("images", ("wide.png", png(np.zeros((64, 200, 3), np.uint8)), "image/png"))]), 413, "12800 px|64x200|200x64"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, response.text
            assert __import__("re").search(message, response.json()["detail"]), response.json()
        assert client.post("/predict", files=[("images", ("ok.png", good, "image/png"))]).status_code == 200


def test_a_model_failure_is_a_500_for_that_batch_only(fitted, monkeypatch):
    model, folder = fitted
    calls = {"count": 0}
    original = model.predict

    def flaky(samples, description="predict"):
        calls["count"] += 1
        if calls["count"] == 1:
            raise RuntimeError("GPU fell off the bus")
        return original(samples, description)

    monkeypatch.setattr(model, "predict", flaky)
    with client_for(model, folder) as client:
        first = client.post("/predict", files=[("images", ("a.png", png(images(1)[0]), "image/png"))])
        assert first.status_code == 500 and "GPU fell off the bus" in first.json()["detail"]
        assert client.post("/predict", files=[("images", ("a.png", png(images(1)[0]), "image/png"))]).status_code == 200
        assert client.get("/health").status_code == 200


def test_concurrent_requests_are_scored_together(fitted):
    model, folder = fitted
    with client_for(model, folder, max_batch=8, max_wait_ms=300) as client:
        answers = []

        def send(index):
            answers.append(client.post("/predict", files=[("images", (f"{index}.png", png(images(1)[0]), "image/png"))]).status_code)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batches = client.app.state.batcher.batches
    assert answers == [200] * 4
    assert sum(batches) == 4 and max(batches) > 1
