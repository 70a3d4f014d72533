#!/usr/bin/env python
"""Load test of ``vad serve`` on localhost against ``vad predict``'s path on the same images.

    vad run --detector patchcore --category brick --output runs/serve-model     # any fitted model
    python benchmarks/serve_load.py --model runs/serve-model/brick/model --images ~/.cache/vad/demo-v1/brick/test \\
        [--requests 200] [--concurrency 1 4 8] [--rounds 3] [--max-batch 8] [--max-wait-ms 5]

Starts ``vad serve`` in a subprocess on a free local port, waits for ``GET /health``, then per
concurrency level sends ``--requests`` single-image ``POST /predict`` requests from that many
client threads (bounded: every request has a 60 s timeout, the whole level at most
``--budget-s``), ``--rounds`` times. The baseline is the model's own prediction path (what ``vad
predict`` runs) on the same decoded images in this process, one image at a time and in batches.
Prints one table: images/s and p50 / p99 latency (medians over the rounds) and the ratio of
images/s to the one-at-a-time baseline. Every reply must be 200 and its score equal to the
baseline's (checked), or the script stops.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vad serve exited with {process.returncode}: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"vad serve did not answer {url}/health within {seconds} s")


def load(url: str, files: list[tuple[str, bytes]], requests: int, concurrency: int, budget_s: float) -> tuple[float, list[float], dict[str, float]]:
    """``requests`` single-image requests from ``concurrency`` threads: (wall seconds, latencies, scores by name)."""
    import httpx

    latencies: list[float] = []
    scores: dict[str, float] = {}
    lock = threading.Lock()
    counter = iter(range(requests))
    stop_at = time.monotonic() + budget_s

    def client() -> None:
        with httpx.Client(timeout=60) as session:
            for index in counter:
                if time.monotonic() > stop_at:
                    return
                name, data = files[index % len(files)]
                start = time.perf_counter()
                reply = session.post(f"{url}/predict", files=[("images", (name, data, "image/png"))])
                elapsed = time.perf_counter() - start
                if reply.status_code != 200:
                    raise SystemExit(f"request {index} answered {reply.status_code}: {reply.text}")
                with lock:
                    latencies.append(elapsed)
                    scores[name] = reply.json()["results"][0]["score"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, type=Path, help="Folder of PNG images (searched recursively).")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--budget-s", type=float, default=300.0)
    args = parser.parse_args()

    from vad.contracts import Sample
    from vad.images import read_rgb
    from vad.model import AnomalyModel
    from vad.predict import resolve_model_folder
    from vad.progress import set_log_mode

    set_log_mode("quiet")
    paths = sorted(args.images.rglob("*.png"))[:64]
    if not paths:
        raise SystemExit(f"no PNG under {args.images}")
    files = [(f"{index:03d}-{path.name}", path.read_bytes()) for index, path in enumerate(paths)]
    model = AnomalyModel.load(resolve_model_folder(args.model), "cpu")
    samples = [Sample(name, 0, "load", "test", image_loader=lambda image=read_rgb(path): image) for (name, _), path in zip(files, paths)]
    rows = []
    baseline = {}
    for label, batch in (("model.predict, 1 image per call", 1), (f"model.predict, {model.batch_size} per call", None)):
        seconds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            if batch == 1:
                outputs = [o for sample in samples for o in model.predict([sample], "baseline")]
            else:
                outputs = list(model.predict(samples, "baseline"))
            seconds.append(time.perf_counter() - start)
            baseline = {o.sample.path: o.score for o in outputs}
        per_second = len(samples) / statistics.median(seconds)
        rows.append((label, "–", per_second, None, None))
    reference = rows[0][2]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "vad.cli", "--quiet", "serve", "--model", args.model, "--port", str(port), "--device", "cpu",
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, process)
        for concurrency in args.concurrency:
            rates, p50s, p99s = [], [], []
            for _ in range(args.rounds):
                wall, latencies, scores = load(url, files, args.requests, concurrency, args.budget_s)
                for name, score in scores.items():
                    if not np.isclose(score, baseline[name], rtol=1e-4, atol=1e-5):
                        raise SystemExit(f"{name}: the service scored {score}, the model {baseline[name]}")
                rates.append(len(latencies) / wall)
                p50s.append(1000 * float(np.percentile(latencies, 50)))
                p99s.append(1000 * float(np.percentile(latencies, 99)))
            rows.append((f"vad serve, {concurrency} client(s)", str(concurrency), statistics.median(rates), statistics.median(p50s), statistics.median(p99s)))
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"{len(paths)} images from {args.images}; model {args.model}; medians of {args.rounds} rounds; max batch {args.max_batch}, max wait {args.max_wait_ms} ms")
    print()
    print("| path | clients | images/s | vs 1 per call | p50 latency ms | p99 latency ms |")
    print("|---|---|---|---|---|---|")
    for label, clients, rate, p50, p99 in rows:
        latency = ("–", "–") if p50 is None else (f"{p50:.0f}", f"{p99:.0f}")
        print(f"| {label} | {clients} | {rate:.1f} | {rate / reference:.2f} | {latency[0]} | {latency[1]} |")


if __name__ == "__main__":
    main()
