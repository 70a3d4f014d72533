#!/usr/bin/env python
"""Is loading the bottleneck? Images/s of decode + resize through vad's data set loaders
against a bare PIL loop over the same files.

    python benchmarks/datasets.py                      # synthetic MVTec-sized files + the demo (~1 min)
    python benchmarks/datasets.py --root ~/data/mvtec_ad --dataset mvtec --category bottle
    python benchmarks/datasets.py --quick              # smoke test

Three ways to turn the same test-split files into 256x256 RGB:

* **bare PIL**: ``Image.open(path).convert("RGB").resize((256, 256), BILINEAR)`` then
  ``np.asarray`` (the floor: no data set code at all);
* **vad loader + PIL resize**: ``sample.load_image()`` (``vad.images.read_rgb`` through the
  sample's lazy loader: header handling, 16-bit / palette / alpha rules) then the same PIL resize;
* **vad loader + vad.preprocess**: ``sample.load_image()`` then ``vad.preprocess.to_batch``
  (torch bilinear resize + normalisation, what ``vad run`` does on the CPU).

Indexing (``dataset.load``, which header-checks every file once) is timed separately. Every
number is the median over ``--runs`` passes after one warm-up pass (files are in the page
cache). Writes a Markdown table to stdout and, with ``--output``, to a file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def synthetic_mvtec(root: Path, count: int) -> Path:
    """An MVTec-layout category ``big`` with 1024x1024 PNG test images (MVTec's typical size)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    texture = np.tile(data.gravel(), (2, 2)).astype(np.float32)
    rng = np.random.default_rng(0)
    folder = root / "big"
    for split in ("train/good", "test/good"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "train" / "good" / "000.png")
    for i in range(count):
        shifted = np.roll(texture, int(rng.integers(0, 1024)), axis=1)
        rgb = np.clip(shifted[..., None] * np.array([1.0, 0.9, 0.8]), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / "test" / "good" / f"{i:03d}.png")
    return root


def median_rates(functions: dict, inputs: dict, count: int, runs: int) -> dict[str, float]:
    """Median images/s of each method over ``runs`` timed passes (after one warm-up pass).

    Methods are interleaved file by file (in a rotating order), so that load from other
    processes on a shared machine hits every method alike instead of biasing whichever ran
    during a spike. ``functions[name](item)`` handles one file; ``inputs[name]`` lists the items.
    """
    names = list(functions)
    for name in names:
        for item in inputs[name]:
            functions[name](item)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(runs):
        spent = dict.fromkeys(names, 0.0)
        for index in range(count):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                functions[name](inputs[name][index])
                spent[name] += time.perf_counter() - start
        for name in names:
            rates[name].append(count / spent[name])
    return {name: statistics.median(values) for name, values in rates.items()}


def measure(name: str, dataset, category: str, size: int, runs: int) -> list[tuple[str, str, float, float]]:
    """Rows ``(files, method, images/s, relative to bare PIL)``."""
    import numpy as np
    from PIL import Image

    from vad.contracts import Preprocessing
    from vad.preprocess import to_batch

    dataset.categories()  # the demo builds itself here: keep that out of the indexing time
    start = time.perf_counter()
    splits = dataset.load(category)
    index_s = time.perf_counter() - start
    samples = splits.test
    paths = [s.path for s in samples]
    preprocessing = Preprocessing(size=(size, size))

    def bare_pil(path):
        with Image.open(path) as image:
            np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))

    def vad_pil(sample):
        np.asarray(Image.fromarray(sample.load_image()).resize((size, size), Image.BILINEAR))

    def vad_torch(sample):
        to_batch([sample.load_image()], preprocessing)

    first = samples[0].load_image()
    label = f"{name} ({len(samples)} files, {first.shape[1]}x{first.shape[0]})"
    functions = {"bare PIL loop": bare_pil, "vad loader + PIL resize": vad_pil, "vad loader + vad.preprocess": vad_torch}
    inputs = {"bare PIL loop": paths, "vad loader + PIL resize": samples, "vad loader + vad.preprocess": samples}
    rates = median_rates(functions, inputs, len(samples), runs)
    base = rates["bare PIL loop"]
    rows = [(label, method, rate, rate / base) for method, rate in rates.items()]
    rows.append((label, "indexing (dataset.load, once)", len(samples) / index_s, float("nan")))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="A data set root to measure instead of the synthetic files.")
    parser.add_argument("--dataset", default="mvtec", help="Data set name for --root (default mvtec).")
    parser.add_argument("--category", help="Category for --root (default: the first).")
    parser.add_argument("--runs", type=int, default=5, help="Timed passes per method (median reported).")
    parser.add_argument("--size", type=int, default=256, help="Resize target (square).")
    parser.add_argument("--count", type=int, default=40, help="Synthetic 1024x1024 files.")
    parser.add_argument("--quick", action="store_true", help="8 files, 2 runs.")
    parser.add_argument("--output", help="Also write the Markdown table here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.count = 2, 8

    import torch

    from vad.plugins import get_registry

    torch.set_num_threads(1)  # PIL decodes on one thread too: compare like with like
    registry = get_registry()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.root:
            dataset = registry.load_class("datasets", args.dataset)(root=args.root)
            category = args.category or dataset.categories()[0]
            rows += measure(f"{args.dataset}/{category}", dataset, category, args.size, args.runs)
        else:
            mvtec = registry.load_class("datasets", "mvtec")
            rows += measure("synthetic PNG", mvtec(root=str(synthetic_mvtec(Path(scratch), args.count))), "big", args.size, args.runs)
            demo = registry.load_class("datasets", "demo")(root=str(Path(scratch) / "demo-v1"))
            rows += measure("demo/gravel PNG", demo, "gravel", args.size, args.runs)

    lines = [
        f"Decode + resize to {args.size}x{args.size}, images/s, median of {args.runs} runs (1 thread; python {sys.version.split()[0]}).",
        "",
        "| files | method | images/s | vs bare PIL |",
        "|---|---|---:|---:|",
    ]
    for files, method, rate, relative in rows:
        rel = "" if relative != relative else f"{relative:.2f}x"
        lines.append(f"| {files} | {method} | {rate:.1f} | {rel} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
