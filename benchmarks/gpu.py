"""GPU checks in one short script: every registered detector on CUDA against the CPU, the shared
training loop with mixed precision, and PatchCore's throughput.

    python benchmarks/gpu.py            # a few minutes on a GPU machine; prints three tables
    python benchmarks/gpu.py --images 64

1. Every registered detector runs vad's conformance kit (fit, predict, state round trip, model
   folder) on the kit's tiny data set on the CPU and on CUDA; the table gives the largest
   score difference relative to the CPU scores' largest magnitude. Tolerance: 1e-3 for
   detectors without training (float32 arithmetic in another order), 5e-2 for trained ones
   (a few epochs of SGD from the same start diverge slowly between devices). TF32 is off for
   this part so that it compares float32 with float32.
2. Each trained detector (``vad.training.TrainedDetector``) on CUDA with and without bfloat16
   autocast (``mixed_precision``): fit time and image AUROC on the tiny data.
3. PatchCore with WideResNet-50 layer2 + layer3 and with EfficientNet-Lite0 at 224 px (random
   weights: speed does not depend on them): predict throughput in images/s (median of three
   timed passes after a warm-up), the memory bank built from ``--train`` images.

4. The deployment paths on the device: PatchCore (Lite0) fitted on the demo data's brick on
   the device, then ``vad serve --device <device>`` load-tested on localhost
   (``benchmarks/serve_load.py``'s client: images/s and p50 / p99 latency at 8 clients), and
   ``vad bench --engine ray`` on a two-category demo grid whose cells each declare the GPU
   (wall time, every cell's status and image AUROC).

Without CUDA the script says so in one line, runs part 1 on the CPU only (so CI and laptops
can run it), part 3 on the CPU with Lite0 only and part 4 on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time


def parity_rows(devices: list[str]) -> list[list[str]]:
    """Part 1: every registered detector through the conformance kit on each device."""
    import torch

    from vad.conformance import check_detector
    from vad.plugins import get_registry
    from vad.training import TrainedDetector

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    registry = get_registry()
    for name in sorted(registry.entries("detectors")):
        cls = registry.load_class("detectors", name)
        runs = {device: check_detector(cls, device=device, onnx=False) for device in devices}
        cpu = runs["cpu"]
        row = [name, f"{cpu.image_auroc:.3f}", f"{cpu.fit_seconds:.2f}"]
        if "cuda" in runs:
            cuda = runs["cuda"]
            scale = float(cpu.scores.abs().max()) or 1.0
            difference = float((cuda.scores - cpu.scores).abs().max()) / scale
            tolerance = 5e-2 if issubclass(cls, TrainedDetector) else 1e-3
            row += [f"{cuda.image_auroc:.3f}", f"{cuda.fit_seconds:.2f}", f"{difference:.1e}", f"{tolerance:.0e}", "ok" if difference <= tolerance else "FAIL"]
        rows.append(row)
    return rows


def mixed_precision_rows() -> list[list[str]]:
    """Part 2: trained detectors on CUDA with and without bfloat16 autocast."""
    from vad.conformance import check_detector
    from vad.plugins import get_registry
    from vad.training import TrainedDetector

    rows = []
    registry = get_registry()
    for name in sorted(registry.entries("detectors")):
        cls = registry.load_class("detectors", name)
        if not issubclass(cls, TrainedDetector):
            continue
        for mixed in (False, True):
            run = check_detector(cls, device="cuda", onnx=False, options={"mixed_precision": mixed, "epochs": 5})
            rows.append([name, "bfloat16 autocast" if mixed else "float32", f"{run.fit_seconds:.2f}", f"{run.image_auroc:.3f}"])
    return rows


def throughput(spec: str, device: str, train: int, images: int, batch: int) -> float:
    """Part 3: PatchCore predict throughput (images/s) with ``spec`` at 224 px."""
    import torch

    from vad.build import create_backbone
    from vad.features import PatchFeatures
    from vad.plugins import get_registry
    from vad_patchcore.detector import PatchCore

    generator = torch.Generator().manual_seed(0)
    source = PatchFeatures(create_backbone(spec, get_registry(), pretrained=False)).to(device)
    detector = PatchCore(coreset_ratio=0.1).to(device)

    def grids(count: int):
        for start in range(0, count, batch):
            images = torch.rand(min(batch, count - start), 3, 224, 224, generator=generator).to(device)
            with torch.inference_mode():
                yield source(images).clone()

    detector.fit(list(grids(train)))
    test = [torch.rand(batch, 3, 224, 224, generator=generator).to(device) for _ in range(max(1, images // batch))]

    def one_pass() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            for images_batch in test:
                detector.predict(source(images_batch))
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_pass()  # warm-up: kernels, allocator
    seconds = statistics.median(one_pass() for _ in range(3))
    return len(test) * batch / seconds


def deployment_rows(device: str, requests: int) -> list[list[str]]:
    """Part 4: ``vad serve`` and ``vad bench --engine ray`` on ``device``."""
    import importlib.util
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from vad.bench import run_bench
    from vad.config import RunConfig
    from vad.pipeline import run

    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).with_name("serve_load.py"))
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vad-gpu-") as folder:
        folder = Path(folder)
        run_folder, _ = run(RunConfig(dataset="demo", categories=["brick"], detectors=["patchcore"], device=device, report=False, output=str(folder / "run")))
        images = sorted((Path.home() / ".cache" / "vad" / "demo-v1" / "brick" / "test").rglob("*.png"))
        files = [(f"{index:03d}-{path.name}", path.read_bytes()) for index, path in enumerate(images)]
        port = serve_load.free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "vad.cli", "--quiet", "serve", "--model", str(run_folder / "brick" / "model"), "--port", str(port), "--device", device],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            serve_load.wait_healthy(url, server)
            serve_load.load(url, files, 16, 4, 120)  # warm-up
            wall, latencies, _ = serve_load.load(url, files, requests, 8, 300)
        finally:
            server.terminate()
            server.wait(timeout=30)
        rows.append(["vad serve, 8 clients", device, f"{len(latencies) / wall:.1f} images/s",
                     f"p50 {1000 * statistics.median(latencies):.0f} ms, p99 {1000 * sorted(latencies)[int(0.99 * (len(latencies) - 1))]:.0f} ms"])
        grid = folder / "grid.yaml"
        grid.write_text(f"dataset: demo\ndevice: {device}\ndetectors: [patchcore]\ncategories: [brick, grass]\n")
        start = time.perf_counter()
        _, results = run_bench(grid, folder / "bench", engine="ray", num_cpus=2)
        cells = ", ".join(f"{r.cell.category} {r.status} {r.metrics.get('image_auroc', float('nan')):.3f}" for r in results)
        rows.append(["vad bench --engine ray, 2 cells", device, f"{time.perf_counter() - start:.1f} s", cells])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64, help="training images of the throughput bank")
    parser.add_argument("--images", type=int, default=256, help="test images per timed pass")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128, help="requests of the serving load test")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    else:
        print("CUDA is not available: the CUDA checks are skipped; parts 1 and 3 run on the CPU only.")
    devices = ["cpu", "cuda"] if cuda else ["cpu"]

    print("\n## 1. Every registered detector, CPU vs CUDA (conformance kit, tiny data)\n")
    header = ["detector", "AUROC cpu", "fit s cpu"] + (["AUROC cuda", "fit s cuda", "max |Δscore| / max|score|", "tolerance", ""] if cuda else [])
    print(table(header, parity_rows(devices)))

    if cuda:
        print("\n## 2. Shared training loop on CUDA, float32 vs bfloat16 autocast (5 epochs, tiny data)\n")
        print(table(["detector", "precision", "fit s", "AUROC"], mixed_precision_rows()))

    print("\n## 3. PatchCore predict throughput at 224 px (random weights)\n")
    specs = ["timm:wide_resnet50_2", "tf_efficientnet_lite0"] if cuda else ["tf_efficientnet_lite0"]
    train, images, batch = (args.train, args.images, args.batch) if cuda else (8, 16, 8)
    rows = [[spec, device, f"{throughput(spec, device, train, images, batch):.1f}"] for spec in specs for device in devices]
    print(table(["backbone", "device", "images/s"], rows))

    print("\n## 4. Serving and the Ray engine on the device (demo data, PatchCore Lite0)\n")
    print(table(["path", "device", "rate", "detail"], deployment_rows("cuda" if cuda else "cpu", args.requests)))


if __name__ == "__main__":
    main()
